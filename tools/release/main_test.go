package main

import (
	"bytes"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

func TestStampedVersion(t *testing.T) {
	for in, want := range map[string]string{"1.2.3": "v1.2.3", "v1.2.3": "v1.2.3", "0.1.0-rc.1": "v0.1.0-rc.1"} {
		if got, err := StampedVersion(in); err != nil || got != want {
			t.Errorf("StampedVersion(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "1.2", "latest", "1.2.3; rm -rf /", "v1.2.3.4"} {
		if got, err := StampedVersion(in); err == nil {
			t.Errorf("StampedVersion(%q) = %q, want an error", in, got)
		}
	}
}

func TestWriteSums(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "linux_amd64"), 0o755)
	os.WriteFile(filepath.Join(dir, "linux_amd64", "b"), []byte("hello\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "a.deb"), nil, 0o644)
	sums, err := WriteSums(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  a.deb\n" +
		"5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03  linux_amd64/b\n"
	if sums != want {
		t.Fatalf("WriteSums = %q, want %q", sums, want)
	}
	if again, _ := WriteSums(dir); again != want {
		t.Fatalf("a second WriteSums counted its own SHA256SUMS: %q", again)
	}
}

// TestReleaseIsReproducible builds one release binary (broker-agent, for
// the machine's own architecture: a full release is six builds, too much
// CPU for every test run) from two fresh clones of HEAD in two different
// directories, and checks that the bytes are the same, that the binary is
// static, carries neither clone's path and prints the stamped version and
// the commit. `make release-verify VERSION=x.y.z` checks the full release
// the same way.
func TestReleaseIsReproducible(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a release binary twice")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	head := git(t, root, "rev-parse", "HEAD")
	tmp := t.TempDir()
	var sums [2]string
	for i, name := range []string{"first-checkout", "second/checkout"} {
		src := filepath.Join(tmp, name)
		git(t, root, "clone", "--quiet", "--shared", "--no-hardlinks", root, src)
		git(t, src, "checkout", "--quiet", head)
		out := filepath.Join(tmp, "out", name)
		var log bytes.Buffer
		s, err := Build{Version: "9.8.7", Source: src, Out: out, Commands: []string{"broker-agent"},
			Platforms: []string{"linux/" + runtime.GOARCH}}.Run(&log)
		if err != nil {
			t.Fatalf("release build %d: %v\n%s", i+1, err, log.Bytes())
		}
		sums[i] = s
		bin := filepath.Join(out, "linux_"+runtime.GOARCH, "broker-agent")
		data, err := os.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(data, []byte(tmp)) {
			t.Errorf("%s contains the build directory %s (-trimpath missing?)", bin, tmp)
		}
		f, err := elf.Open(bin)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Errorf("%s has an ELF interpreter: not static", bin)
			}
		}
		f.Close()
		if runtime.GOOS == "linux" {
			got, err := exec.Command(bin, "--version").CombinedOutput()
			if err != nil {
				t.Fatalf("%s --version: %v\n%s", bin, err, got)
			}
			if !strings.Contains(string(got), "v9.8.7 (commit "+head[:12]+",") || strings.Contains(string(got), "+modified") {
				t.Errorf("%s --version = %q, want v9.8.7 and commit %s, unmodified", bin, got, head[:12])
			}
		}
	}
	if sums[0] != sums[1] {
		t.Fatalf("two builds of commit %s differ:\n%s\n%s", head, sums[0], sums[1])
	}
	if len(sums[0]) < 64 || !strings.HasSuffix(sums[0], "  linux_"+runtime.GOARCH+"/broker-agent\n") {
		t.Fatalf("SHA256SUMS = %q, want one line for broker-agent", sums[0])
	}
	t.Logf("both builds: %s", sums[0])
}

func git(t *testing.T, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return strings.TrimSpace(string(out))
}
