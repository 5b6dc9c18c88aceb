package postgres

// ResetPool closes the engine's idle connections, so the next query opens
// a new one with the current password.
func (e *Engine) ResetPool() { e.inner.(*engine).pool.Reset() }
