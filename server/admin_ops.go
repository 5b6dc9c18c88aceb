package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// ConfigReloader re-reads brokerd's configuration file and applies it
// while brokerd runs (daemon.Daemon).
type ConfigReloader interface {
	ReloadConfig(ctx context.Context) (ConfigReload, error)
}

// ConfigReload says what a reload applied. It never holds a secret.
type ConfigReload struct {
	File string
	// Changes are one line per key path that changed.
	Changes []string
}

// Errors a ConfigReloader returns when it applied nothing; their messages
// name the keys.
var (
	// ErrConfigInvalid: the file does not parse or validate (InvalidArgument).
	ErrConfigInvalid = errors.New("the configuration file is invalid")
	// ErrConfigNotLive: the file changes keys that cannot change while
	// brokerd runs (FailedPrecondition).
	ErrConfigNotLive = errors.New("the configuration changes keys that need a restart")
)

// StoreBackup writes a consistent snapshot of the lease store.
type StoreBackup interface {
	// BackupStore writes the snapshot to w and returns its format
	// ("bbolt", "etcd-export") and size.
	BackupStore(ctx context.Context, w io.Writer) (format string, size int64, err error)
}

func (s *adminServer) ReloadConfig(ctx context.Context, _ *pb.ReloadConfigRequest) (*pb.ReloadConfigResponse, error) {
	if s.reloader == nil {
		return nil, status.Error(codes.Unimplemented, "this broker has no configuration file to reload")
	}
	res, err := s.reloader.ReloadConfig(ctx)
	switch {
	case err == nil:
		return &pb.ReloadConfigResponse{ConfigFile: res.File, Changes: res.Changes}, nil
	case errors.Is(err, ErrConfigInvalid):
		return nil, status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ErrConfigNotLive):
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	default:
		return nil, s.fail(ctx, err)
	}
}

// backupChunk is the size of one BackupStoreResponse's data, well under
// gRPC's default 4 MiB message limit of clients.
const backupChunk = 256 << 10

// BackupStore spools the snapshot to an unlinked temporary file, then
// streams it. The spool keeps the store's read transaction (bbolt) short
// whatever the client's speed: a long one delays commits that grow the
// file. The file holds lease records (no password) and is gone when the
// call ends, even if brokerd is killed, being unlinked once open.
func (s *adminServer) BackupStore(_ *pb.BackupStoreRequest, stream pb.AdminService_BackupStoreServer) error {
	ctx := stream.Context()
	if s.backup == nil {
		return status.Error(codes.Unimplemented, "this broker does not back up its store")
	}
	spool, err := os.CreateTemp("", "credbroker-backup-*")
	if err != nil {
		return s.fail(ctx, fmt.Errorf("backup: spool file: %w", err))
	}
	_ = os.Remove(spool.Name())
	defer spool.Close()
	format, size, err := s.backup.BackupStore(ctx, spool)
	if err != nil {
		return s.fail(ctx, fmt.Errorf("backup: %w", err))
	}
	if _, err := spool.Seek(0, io.SeekStart); err != nil {
		return s.fail(ctx, fmt.Errorf("backup: spool file: %w", err))
	}
	buf := make([]byte, backupChunk)
	first := true
	for {
		n, err := io.ReadFull(spool, buf)
		if n > 0 || first {
			msg := &pb.BackupStoreResponse{Data: buf[:n]}
			if first {
				msg.Format, first = format, false
			}
			if err := stream.Send(msg); err != nil {
				return err
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return s.fail(ctx, fmt.Errorf("backup: spool file: %w", err))
		}
	}
	return stream.Send(&pb.BackupStoreResponse{Size: size})
}
