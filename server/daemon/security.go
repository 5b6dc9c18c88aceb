package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

// security is what the gRPC server needs from the security configuration.
type security struct {
	authenticator server.Authenticator
	authorizer    server.Authorizer
	// policy is authenticator and authorizer, which a reload replaces
	// (reload.go); quotas likewise.
	policy *livePolicy
	quotas *server.LiveQuotas
	// auditor is nil without audit.path.
	auditor server.RequestAuditor
	// auditRequired is audit.required.
	auditRequired bool
	// serverOptions holds the TLS credentials, if any.
	serverOptions []grpc.ServerOption
	// certs serves and reloads the TLS files (nil without tls).
	certs *server.CertReloader
}

// newSecurity builds the authenticator, authorizer, quotas, auditor and
// TLS credentials of the configuration. Without tls and tokens it returns
// the loopback defaults: every caller is the local admin and may issue
// every role. auditLog may be nil.
func newSecurity(sec config.Security, auditLog *audit.Log, logger *slog.Logger) (*security, error) {
	pol, err := newPolicy(sec)
	if err != nil {
		return nil, err
	}
	live := &livePolicy{}
	live.p.Store(pol)
	out := &security{authenticator: live, authorizer: live, policy: live, quotas: server.NewLiveQuotas(quotas(sec))}
	if auditLog != nil {
		out.auditor = auditLog
		out.auditRequired = sec.Audit.Required
	}
	if !sec.Enabled() {
		return out, nil
	}
	if sec.TLS != nil {
		var onReload func(error)
		if auditLog != nil {
			onReload = func(err error) {
				rec := audit.Record{Event: audit.EventTLSReload, Outcome: audit.OutcomeOK, Message: sec.TLS.CertFile}
				if err != nil {
					rec.Outcome, rec.Message = audit.OutcomeError, err.Error()
				}
				auditLog.Record(rec)
			}
		}
		certs, err := server.NewCertReloader(server.TLSFiles{
			CertFile:     sec.TLS.CertFile,
			KeyFile:      sec.TLS.KeyFile,
			ClientCAFile: sec.TLS.ClientCAFile,
			// Token callers have no certificate to present.
			ClientCertOptional: len(sec.Tokens) > 0,
		}, logger, onReload)
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		out.certs = certs
		out.serverOptions = append(out.serverOptions, grpc.Creds(credentials.NewTLS(certs.ServerConfig())))
	}
	return out, nil
}

// quotas are sec's quotas as the gRPC server takes them.
func quotas(sec config.Security) server.Quotas {
	return server.Quotas{
		IdentityMaxActive: sec.Quotas.IdentityMaxActive,
		RoleMaxActive:     sec.Quotas.RoleMaxActive,
		IssueRate:         sec.Quotas.IssueRate,
		IssueBurst:        sec.Quotas.IssueBurst,
	}
}

// policy is who may call and what they may do: an immutable pair that a
// reload replaces whole.
type policy struct {
	authn server.Authenticator
	authz server.Authorizer
}

// newPolicy builds sec's authenticator and authorizer. Without tls and
// tokens every caller is the local admin and may issue every role.
func newPolicy(sec config.Security) (*policy, error) {
	if !sec.Enabled() {
		return &policy{authn: server.LocalAuthenticator{}, authz: server.OwnerAuthorizer{}}, nil
	}
	tokens := make([]server.TokenEntry, 0, len(sec.Tokens))
	for _, t := range sec.Tokens {
		tokens = append(tokens, server.TokenEntry{Identity: t.Identity, SHA256: t.SHA256})
	}
	authn, err := server.NewPolicyAuthenticator(tokens, sec.Admins)
	if err != nil {
		return nil, fmt.Errorf("tokens/admins: %w", err)
	}
	authz, err := server.NewPolicyAuthorizer(sec.Allowed)
	if err != nil {
		return nil, fmt.Errorf("roles[].allowed: %w", err)
	}
	return &policy{authn: authn, authz: authz}, nil
}

// livePolicy is the policy in force: each call reads it once per check.
type livePolicy struct{ p atomic.Pointer[policy] }

func (l *livePolicy) Authenticate(ctx context.Context) (server.Identity, error) {
	return l.p.Load().authn.Authenticate(ctx)
}

func (l *livePolicy) AuthorizeAdmin(id server.Identity) error {
	return l.p.Load().authz.AuthorizeAdmin(id)
}

func (l *livePolicy) AuthorizeIssue(id server.Identity, role string) error {
	return l.p.Load().authz.AuthorizeIssue(id, role)
}

func (l *livePolicy) AuthorizeLease(id server.Identity, lease broker.Lease) error {
	return l.p.Load().authz.AuthorizeLease(id, lease)
}
