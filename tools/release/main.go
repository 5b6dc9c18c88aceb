// Command release builds credbroker's release binaries: static
// (CGO_ENABLED=0), -trimpath, for every platform, with the version and the
// commit stamped (what --version prints), and a SHA256SUMS file:
//
//	go run ./tools/release --version 1.2.3 --out dist/credbroker_1.2.3
//
// `make release VERSION=1.2.3` runs it. Two builds of the same commit give
// the same bytes (see the test): nothing of the build machine goes in,
// neither paths (-trimpath) nor a time other than the commit's.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// Commands are the binaries a release ships; Platforms the GOOS/GOARCH
// pairs it builds them for.
var (
	Commands  = []string{"brokerd", "brokerctl", "broker-agent"}
	Platforms = []string{"linux/amd64", "linux/arm64"}
)

// What the linker sets (package buildinfo's stamp).
const (
	versionVar = "github.com/credbroker/credbroker/internal/buildinfo.version"
	commitVar  = "github.com/credbroker/credbroker/internal/buildinfo.commit"
)

// Build describes one release build.
type Build struct {
	Version   string   // "1.2.3" or "v1.2.3"; stamped as "v1.2.3"
	Source    string   // the checkout to build from (its commit is stamped)
	Out       string   // output directory: Out/linux_amd64/brokerd, ..., Out/SHA256SUMS
	Commands  []string // default Commands
	Platforms []string // default Platforms
	Env       []string // extra environment for go build (tests set GOFLAGS, say)
}

var semver = regexp.MustCompile(`^v?[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$`)

// StampedVersion is the version a release of v carries: "v" and semver.
func StampedVersion(v string) (string, error) {
	if !semver.MatchString(v) {
		return "", fmt.Errorf("version %q is not x.y.z (semantic versioning, an optional -suffix)", v)
	}
	return "v" + strings.TrimPrefix(v, "v"), nil
}

// Run builds every command for every platform into b.Out and writes
// b.Out/SHA256SUMS over everything in b.Out. It returns the checksum
// file's text.
func (b Build) Run(stdout io.Writer) (string, error) {
	v, err := StampedVersion(b.Version)
	if err != nil {
		return "", err
	}
	cmds, platforms := b.Commands, b.Platforms
	if cmds == nil {
		cmds = Commands
	}
	if platforms == nil {
		platforms = Platforms
	}
	out, err := filepath.Abs(b.Out)
	if err != nil {
		return "", err
	}
	// The commit is stamped explicitly too: the go command records none
	// in a `git worktree` checkout.
	rev := exec.Command("git", "rev-parse", "HEAD")
	rev.Dir = b.Source
	head, err := rev.Output()
	if err != nil {
		return "", fmt.Errorf("git rev-parse HEAD in %s: %v (a release is built from a git checkout)", b.Source, err)
	}
	commit := strings.TrimSpace(string(head))
	if ents, err := os.ReadDir(out); err == nil && len(ents) > 0 {
		return "", fmt.Errorf("%s is not empty: a release starts from nothing", b.Out)
	}
	for _, pl := range platforms {
		goos, goarch, ok := strings.Cut(pl, "/")
		if !ok {
			return "", fmt.Errorf("platform %q is not GOOS/GOARCH", pl)
		}
		dir := filepath.Join(out, goos+"_"+goarch)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", err
		}
		for _, c := range cmds {
			// -buildvcs=true: the commit, its time and whether the tree
			// was modified go in where the go command finds the
			// repository. -buildid= and -s -w: no build id, symbol table
			// or DWARF (smaller, and nothing that could vary).
			args := []string{"build", "-trimpath", "-buildvcs=true",
				"-ldflags", "-s -w -buildid= -X " + versionVar + "=" + v + " -X " + commitVar + "=" + commit,
				"-o", filepath.Join(dir, c), "./cmd/" + c}
			cmd := exec.Command("go", args...)
			cmd.Dir = b.Source
			cmd.Env = append(append(os.Environ(), "CGO_ENABLED=0", "GOOS="+goos, "GOARCH="+goarch), b.Env...)
			cmd.Stdout, cmd.Stderr = stdout, os.Stderr
			fmt.Fprintf(stdout, "go %s (GOOS=%s GOARCH=%s CGO_ENABLED=0)\n", strings.Join(args, " "), goos, goarch)
			if err := cmd.Run(); err != nil {
				return "", fmt.Errorf("building %s for %s: %w", c, pl, err)
			}
		}
	}
	return WriteSums(out)
}

// WriteSums writes dir/SHA256SUMS for every regular file under dir (but
// itself), in `sha256sum` format with paths relative to dir, sorted, so
// `sha256sum -c SHA256SUMS` in dir checks them.
func WriteSums(dir string) (string, error) {
	var lines []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() == "SHA256SUMS" {
			return err
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("%s is not a regular file", p)
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		lines = append(lines, hex.EncodeToString(h.Sum(nil))+"  "+filepath.ToSlash(rel))
		return nil
	})
	if err != nil {
		return "", err
	}
	if len(lines) == 0 {
		return "", errors.New("nothing to checksum in " + dir)
	}
	sort.Slice(lines, func(i, j int) bool { return lines[i][66:] < lines[j][66:] })
	text := strings.Join(lines, "\n") + "\n"
	return text, os.WriteFile(filepath.Join(dir, "SHA256SUMS"), []byte(text), 0o644)
}

func main() {
	var b Build
	var sumsOnly bool
	flag.StringVar(&b.Version, "version", "", "release version, x.y.z (required)")
	flag.StringVar(&b.Out, "out", "", "output directory (default dist/credbroker_VERSION)")
	flag.StringVar(&b.Source, "source", ".", "the checkout to build")
	flag.BoolVar(&sumsOnly, "sums-only", false, "only rewrite OUT/SHA256SUMS (after packages or images were added)")
	flag.Parse()
	if b.Version == "" {
		fmt.Fprintln(os.Stderr, "usage: go run ./tools/release --version x.y.z [--out DIR]")
		os.Exit(2)
	}
	if b.Out == "" {
		b.Out = filepath.Join("dist", "credbroker_"+strings.TrimPrefix(b.Version, "v"))
	}
	var sums string
	var err error
	if sumsOnly {
		sums, err = WriteSums(b.Out)
	} else {
		sums, err = b.Run(os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "release:", err)
		os.Exit(1)
	}
	fmt.Printf("%s/SHA256SUMS:\n%s", b.Out, sums)
}
