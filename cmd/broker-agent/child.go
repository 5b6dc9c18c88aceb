package main

import (
	"errors"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// restartGrace is how long a child restarted on replacement gets between
// SIGTERM and SIGKILL.
const restartGrace = 10 * time.Second

// child is the application run in exec mode.
type child struct {
	argv   []string
	cmd    *exec.Cmd
	exited chan int // receives the exit code once
}

func startChild(argv []string, credEnv []string) (*child, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), credEnv...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{argv: argv, cmd: cmd, exited: make(chan int, 1)}
	go func() {
		c.exited <- exitCode(cmd.Wait())
	}()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) signal(s syscall.Signal) { _ = c.cmd.Process.Signal(s) }

// restart stops the child (SIGTERM, then SIGKILL after restartGrace) and
// starts it again with the new credential.
func (c *child) restart(credEnv []string) (*child, error) {
	c.signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(restartGrace):
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
	return startChild(c.argv, credEnv)
}

// exitCode is the status a shell would report: the code, or 128+signal.
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ee.ExitCode()
	}
	return 1
}
