// Package buildinfo says which build of credbroker is running: the module
// version and the commit it was built from, as the Go toolchain records
// them in the binary (runtime/debug.ReadBuildInfo), or the release version
// `make release` stamps with the linker. Every binary's --version prints it.
package buildinfo

import (
	"runtime/debug"
	"strings"
)

// version and commit are set by release builds (tools/release) with
// -ldflags "-X github.com/credbroker/credbroker/internal/buildinfo.version=v1.2.3".
// version replaces the module version, which is "(devel)" or a
// pseudo-version for a build from a checkout; commit stands in for the
// toolchain's vcs.revision when it recorded none (the go command does not
// find the repository of a `git worktree` checkout, whose .git is a file).
var version, commit string

// Info is what the toolchain recorded about a build.
type Info struct {
	// Version is the release version stamped by `make release`, else the
	// main module's version: a tag for `go install module@version`,
	// "(devel)" or a pseudo-version for a build from a checkout.
	Version string
	// Commit is the VCS revision (empty when built without VCS
	// information), Time its commit time, and Modified whether the
	// working tree had uncommitted changes.
	Commit   string
	Time     string
	Modified bool
	// GoVersion is the toolchain that built the binary.
	GoVersion string
}

// Read returns the running binary's build information.
func Read() Info {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return Info{Version: "unknown"}
	}
	return stamp(fromBuildInfo(bi), version, commit)
}

// stamp puts a release version, when there is one, in place of the
// module's, and a release commit where the toolchain recorded none.
func stamp(info Info, release, releaseCommit string) Info {
	if release != "" {
		info.Version = release
	}
	if info.Commit == "" {
		info.Commit = releaseCommit
	}
	return info
}

func fromBuildInfo(bi *debug.BuildInfo) Info {
	info := Info{Version: bi.Main.Version, GoVersion: bi.GoVersion}
	if info.Version == "" {
		info.Version = "(devel)"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			info.Commit = s.Value
		case "vcs.time":
			info.Time = s.Value
		case "vcs.modified":
			info.Modified = s.Value == "true"
		}
	}
	return info
}

// String is one line: "v1.2.3 (commit 0123abcd4567, 2026-12-01T10:00:00Z, go1.26.0)",
// with "+modified" after a commit built from a changed tree.
func (i Info) String() string {
	var b strings.Builder
	b.WriteString(i.Version)
	var parts []string
	if i.Commit != "" {
		c := "commit " + i.Commit
		if len(i.Commit) > 12 {
			c = "commit " + i.Commit[:12]
		}
		if i.Modified {
			c += "+modified"
		}
		parts = append(parts, c)
	}
	if i.Time != "" {
		parts = append(parts, i.Time)
	}
	if i.GoVersion != "" {
		parts = append(parts, i.GoVersion)
	}
	if len(parts) > 0 {
		b.WriteString(" (" + strings.Join(parts, ", ") + ")")
	}
	return b.String()
}
