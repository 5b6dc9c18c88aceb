package main

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/credbroker/credbroker/internal/pgtest"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

// TestImage builds the image index, checks it holds an image for each
// architecture with a non-root user, CA certificates and no shell, and
// runs the machine's architecture's image: with podman where podman can
// run containers, else from its unpacked layers (chroot as the image's
// user when the test is root): brokerd --version, then a real brokerd
// against a throwaway PostgreSQL, and a credential issued by the image's
// brokerctl.
func TestImage(t *testing.T) {
	o := release(t)
	ociTar, err := BuildImage(o)
	if err != nil {
		t.Fatal(err)
	}
	again, err := BuildImage(Options{Version: o.Version, Root: o.Root, Release: o.Release, Out: t.TempDir(), Arches: o.Arches, MTime: o.MTime, Commit: o.Commit})
	if err != nil {
		t.Fatal(err)
	}
	if a, b := sha256File(t, ociTar), sha256File(t, again); a != b {
		t.Errorf("two image builds differ: %s and %s", a, b)
	}

	dir := t.TempDir()
	untar(t, ociTar, filepath.Join(dir, "oci"), false)
	idx, err := layout.ImageIndexFromPath(filepath.Join(dir, "oci"))
	if err != nil {
		t.Fatal(err)
	}
	outer, err := idx.IndexManifest()
	if err != nil || len(outer.Manifests) != 1 || outer.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "credbroker:"+o.Version {
		t.Fatalf("index.json: %+v, %v; want one index named %s", outer, err, o.Version)
	}
	multi, err := idx.ImageIndex(outer.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	im, err := multi.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	var platforms []string
	var native v1.Image
	for _, d := range im.Manifests {
		platforms = append(platforms, d.Platform.String())
		img, err := multi.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if cf.Architecture != d.Platform.Architecture || cf.OS != "linux" {
			t.Errorf("%s: config says %s/%s", d.Platform, cf.OS, cf.Architecture)
		}
		if cf.Config.User != "65532:65532" || len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != "/usr/bin/brokerd" {
			t.Errorf("%s: user %q entrypoint %q, want 65532:65532 and /usr/bin/brokerd", d.Platform, cf.Config.User, cf.Config.Entrypoint)
		}
		if cf.Config.Labels["org.opencontainers.image.revision"] != o.Commit || cf.Config.Labels["org.opencontainers.image.version"] != o.Version {
			t.Errorf("%s: labels %v", d.Platform, cf.Config.Labels)
		}
		if d.Platform.Architecture == runtime.GOARCH {
			native = img
		}
	}
	sort.Strings(platforms)
	var want []string
	for _, a := range o.Arches {
		want = append(want, "linux/"+a)
	}
	sort.Strings(want)
	if strings.Join(platforms, " ") != strings.Join(want, " ") {
		t.Fatalf("index platforms %v, want %v", platforms, want)
	}
	if native == nil {
		t.Fatalf("no image for this machine's linux/%s", runtime.GOARCH)
	}

	// The file system of this machine's image.
	root := filepath.Join(dir, "rootfs")
	rc := mutate.Extract(native)
	untarReader(t, rc, root, true)
	rc.Close()
	mustExist(t, filepath.Join(root, "usr/bin/brokerd"), filepath.Join(root, "usr/bin/brokerctl"), filepath.Join(root, "usr/bin/broker-agent"))
	for _, shell := range []string{"bin/sh", "usr/bin/sh", "bin/bash", "bin/busybox"} {
		if _, err := os.Lstat(filepath.Join(root, shell)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the image has /%s (%v): it should have no shell", shell, err)
		}
	}
	if ca, err := os.ReadFile(filepath.Join(root, "etc/ssl/certs/ca-certificates.crt")); err != nil || strings.Count(string(ca), "BEGIN CERTIFICATE") < 10 {
		t.Errorf("CA certificates: %v, %d certificates", err, strings.Count(string(ca), "BEGIN CERTIFICATE"))
	}
	if passwd, _ := os.ReadFile(filepath.Join(root, "etc/passwd")); !strings.Contains(string(passwd), "credbroker:x:65532:65532:") {
		t.Errorf("/etc/passwd = %q, want the user credbroker (65532)", passwd)
	}
	if fi, err := os.Stat(filepath.Join(root, "var/lib/credbroker")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("/var/lib/credbroker: %v %v, want mode 0700", fi, err)
	}

	if out, err := podmanRun(t, ociTar, "credbroker:"+o.Version); err == nil {
		if !strings.Contains(out, "v"+o.Version+" (commit "+o.Commit[:12]) {
			t.Errorf("podman run credbroker:%s --version = %q", o.Version, out)
		}
		t.Logf("podman ran the image: %s", strings.TrimSpace(out))
	} else {
		t.Logf("podman did not run the image (%v): running it from its unpacked layers", err)
	}
	chroot := os.Geteuid() == 0
	in := func(cmd *exec.Cmd) *exec.Cmd {
		if chroot {
			cmd.Path = strings.TrimPrefix(cmd.Path, root)
			cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root, Credential: &syscall.Credential{Uid: 65532, Gid: 65532}}
			cmd.Dir = "/var/lib/credbroker"
			cmd.Env = []string{"PATH=/usr/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"}
		}
		return cmd
	}
	if !chroot {
		t.Log("not root: the binaries run without chroot, as this user")
	}
	version, err := in(exec.Command(filepath.Join(root, "usr/bin/brokerd"), "--version")).CombinedOutput()
	if err != nil || !strings.Contains(string(version), "v"+o.Version+" (commit "+o.Commit[:12]) {
		t.Fatalf("the image's brokerd --version: %q, %v; want v%s and commit %s", version, err, o.Version, o.Commit[:12])
	}
	t.Logf("the image's brokerd --version: %s", strings.TrimSpace(string(version)))

	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	addr := freeAddr(t)
	example, err := os.ReadFile(filepath.Join(o.Root, "deploy", "debian", "credbroker.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	config := exampleConfig(t, string(example), tg, addr)
	if !chroot {
		config = strings.ReplaceAll(config, "/var/lib/credbroker", filepath.Join(root, "var/lib/credbroker"))
	}
	if err := os.WriteFile(filepath.Join(root, "etc/credbroker/credbroker.yaml"), []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	pw := filepath.Join(root, "var/lib/credbroker/main.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword), 0o600); err != nil {
		t.Fatal(err)
	}
	if chroot {
		if err := os.Chown(pw, 65532, 65532); err != nil {
			t.Fatal(err)
		}
	}
	configPath := "/etc/credbroker/credbroker.yaml"
	if !chroot {
		configPath = filepath.Join(root, configPath)
	}
	startBrokerd(t, in(exec.Command(filepath.Join(root, "usr/bin/brokerd"), "--config", configPath)), addr)
	// brokerctl from the image too: what `kubectl exec` would run.
	issueAndLogin(t, func(args ...string) *exec.Cmd {
		return in(exec.Command(filepath.Join(root, "usr/bin/brokerctl"), args...))
	}, addr, tg)
	if _, err := os.Stat(filepath.Join(root, "var/lib/credbroker/leases.db")); err != nil {
		t.Errorf("the lease store in the image's /var/lib/credbroker: %v", err)
	}
}

// podmanRun loads the image into podman and runs `brokerd --version` in a
// container, where podman is installed. On this project's machines podman
// loads the image but cannot run containers (crun: setrlimit: Operation
// not permitted), so an error here is logged, not a failure.
func podmanRun(t *testing.T, ociTar, name string) (string, error) {
	t.Helper()
	if _, err := exec.LookPath("podman"); err != nil {
		return "", errors.New("podman is not installed")
	}
	if out, err := exec.Command("podman", "load", "-q", "-i", ociTar).CombinedOutput(); err != nil {
		return "", fmt.Errorf("podman load: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("podman", "rmi", "-f", "localhost/"+name).Run() })
	out, err := exec.Command("podman", "run", "--rm", "--network=none", "localhost/"+name, "--version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("podman run: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	return run(t, "sha256sum", path)[:64]
}

func untar(t *testing.T, file, dir string, owners bool) {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	untarReader(t, f, dir, owners)
}

// untarReader unpacks a tar of regular files and directories (all an
// image of ours holds) into dir, with owners when asked and allowed.
func untarReader(t *testing.T, r io.Reader, dir string, owners bool) {
	t.Helper()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(p, dir) {
			t.Fatalf("tar entry %q escapes", h.Name)
		}
		mode := os.FileMode(h.Mode).Perm()
		if h.Mode&0o1000 != 0 {
			mode |= os.ModeSticky
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(f, tr); err != nil {
				t.Fatal(err)
			}
			f.Close()
		default:
			t.Fatalf("tar entry %q of type %c: the image should hold only files and directories", h.Name, h.Typeflag)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if owners && os.Geteuid() == 0 {
			if err := os.Lchown(p, h.Uid, h.Gid); err != nil {
				t.Fatal(err)
			}
		}
	}
}
