// Command dist turns the binaries of a release (`go run ./tools/release`)
// into what operators install: a Debian package per architecture, built
// with nfpm, and a multi-architecture container image, built with
// go-containerregistry (no Docker daemon), as an OCI layout in a tar file:
//
//	go run . deb   --version 1.2.3 --root ../.. --release ../../dist/credbroker_1.2.3
//	go run . image --version 1.2.3 --root ../.. --release ../../dist/credbroker_1.2.3
//
// `make release VERSION=1.2.3` runs both. Every file's time is the commit's
// (SOURCE_DATE_EPOCH), so the same commit gives the same bytes.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Arches are the architectures a release has binaries for
// (release/linux_<arch>/).
var Arches = []string{"amd64", "arm64"}

// Commands are the binaries each artifact carries.
var Commands = []string{"brokerd", "brokerctl", "broker-agent"}

// Options say where a release's inputs are and what to call it.
type Options struct {
	Version string    // x.y.z, without "v"
	Root    string    // the repository: deploy/debian, LICENSE, README.md
	Release string    // the release directory: linux_<arch>/<command>
	Out     string    // where artifacts are written; "" is Release
	Arches  []string  // default Arches
	MTime   time.Time // every file's time
	Commit  string    // the commit, for the image's labels
}

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "deb" && os.Args[1] != "image") {
		fmt.Fprintln(os.Stderr, "usage: dist deb|image --version x.y.z --root REPO --release DIR")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	var o Options
	var arches string
	fs.StringVar(&o.Version, "version", "", "release version x.y.z (required)")
	fs.StringVar(&o.Root, "root", "../..", "the credbroker repository")
	fs.StringVar(&o.Release, "release", "", "the release directory tools/release wrote (required)")
	fs.StringVar(&arches, "arches", strings.Join(Arches, ","), "architectures")
	fs.Parse(os.Args[2:])
	o.Arches = strings.Split(arches, ",")
	if err := o.complete(); err != nil {
		fmt.Fprintln(os.Stderr, "dist:", err)
		os.Exit(2)
	}
	var out []string
	var err error
	if os.Args[1] == "deb" {
		out, err = BuildDebs(o)
	} else {
		var p string
		p, err = BuildImage(o)
		out = []string{p}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dist:", err)
		os.Exit(1)
	}
	for _, p := range out {
		fmt.Println(p)
	}
}

// complete checks the options and fills the time and commit from the
// repository: SOURCE_DATE_EPOCH when set, else the commit's time.
func (o *Options) complete() error {
	o.Version = strings.TrimPrefix(o.Version, "v")
	if o.Version == "" || o.Release == "" {
		return errors.New("--version and --release are required")
	}
	if len(o.Arches) == 0 {
		o.Arches = Arches
	}
	if o.Out == "" {
		o.Out = o.Release
	}
	commit, err := gitOutput(o.Root, "rev-parse", "HEAD")
	if err != nil {
		return err
	}
	o.Commit = commit
	epoch := os.Getenv("SOURCE_DATE_EPOCH")
	if epoch == "" {
		if epoch, err = gitOutput(o.Root, "log", "-1", "--format=%ct"); err != nil {
			return err
		}
	}
	sec, err := strconv.ParseInt(epoch, 10, 64)
	if err != nil {
		return fmt.Errorf("SOURCE_DATE_EPOCH %q: %v", epoch, err)
	}
	o.MTime = time.Unix(sec, 0).UTC()
	return nil
}

func gitOutput(dir string, args ...string) (string, error) {
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("git %s in %s: %v", strings.Join(args, " "), dir, err)
	}
	return strings.TrimSpace(string(out)), nil
}

func (o Options) binary(arch, cmd string) string {
	return filepath.Join(o.Release, "linux_"+arch, cmd)
}
