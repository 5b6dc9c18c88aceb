package server

import (
	"context"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// StatusSource reports the broker group this brokerd belongs to
// (server/daemon: the etcd group's registrations and election, or the one
// instance of a bbolt store).
type StatusSource interface {
	GroupStatus(ctx context.Context) (GroupStatus, error)
}

// GroupStatus is a broker group as GetStatus shows it.
type GroupStatus struct {
	// Store is the backend: "bbolt" or "etcd".
	Store     string
	Instances []InstanceStatus
	// Leader is the leading instance's name; "" while none leads.
	Leader      string
	LeaderSince time.Time
	// Self is the name of the instance answering.
	Self string
}

// InstanceStatus is one brokerd of a group.
type InstanceStatus struct {
	Name      string
	Address   string
	Version   string
	StartTime time.Time
}

func (s *adminServer) GetStatus(ctx context.Context, _ *pb.GetStatusRequest) (*pb.GetStatusResponse, error) {
	if s.status == nil {
		return nil, status.Error(codes.Unimplemented, "this broker does not report its group's status")
	}
	st, err := s.status.GroupStatus(ctx)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	resp := &pb.GetStatusResponse{Store: st.Store, Leader: st.Leader, AnsweredBy: st.Self}
	if !st.LeaderSince.IsZero() {
		resp.LeaderSince = timestamppb.New(st.LeaderSince)
	}
	for _, in := range st.Instances {
		pi := &pb.Instance{Name: in.Name, Address: in.Address, Version: in.Version, Leader: in.Name == st.Leader}
		if !in.StartTime.IsZero() {
			pi.StartTime = timestamppb.New(in.StartTime)
		}
		resp.Instances = append(resp.Instances, pi)
	}
	return resp, nil
}
