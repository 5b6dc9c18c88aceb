package buildinfo

import (
	"runtime/debug"
	"testing"
)

func TestString(t *testing.T) {
	for _, tc := range []struct {
		bi   debug.BuildInfo
		want string
	}{
		{debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "v1.2.3"}}, "v1.2.3 (go1.26.0)"},
		{debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "0123456789abcdef0123"}, {Key: "vcs.time", Value: "2026-12-01T10:00:00Z"},
			{Key: "vcs.modified", Value: "true"},
		}}, "(devel) (commit 0123456789ab+modified, 2026-12-01T10:00:00Z, go1.26.0)"},
		{debug.BuildInfo{}, "(devel)"},
	} {
		if got := fromBuildInfo(&tc.bi).String(); got != tc.want {
			t.Errorf("String() = %q, want %q", got, tc.want)
		}
	}
}

func TestStampedReleaseVersionWins(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
		{Key: "vcs.revision", Value: "0123456789abcdef0123"}, {Key: "vcs.time", Value: "2026-12-01T10:00:00Z"},
	}}
	if got, want := stamp(fromBuildInfo(bi), "v1.2.3", "fedcba9876543210").String(), "v1.2.3 (commit 0123456789ab, 2026-12-01T10:00:00Z, go1.26.0)"; got != want {
		t.Errorf("stamped String() = %q, want %q", got, want)
	}
	if got := stamp(fromBuildInfo(bi), "", "").Version; got != "(devel)" {
		t.Errorf("unstamped Version = %q, want the module's (devel)", got)
	}
	noVCS := &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "(devel)"}}
	if got, want := stamp(fromBuildInfo(noVCS), "v1.2.3", "fedcba9876543210").String(), "v1.2.3 (commit fedcba987654, go1.26.0)"; got != want {
		t.Errorf("stamped without VCS information: String() = %q, want %q", got, want)
	}
}
