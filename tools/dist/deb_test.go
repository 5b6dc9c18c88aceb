package main

import (
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/credbroker/credbroker/internal/pgtest"
)

// TestDebianPackage builds the package for this machine's architecture,
// installs it with dpkg into this machine, checks its files, modes and
// user, runs the installed brokerd as the credbroker user with the
// installed configuration pointed at a throwaway PostgreSQL, issues a
// credential with the installed brokerctl, and removes and purges it.
// It needs root and dpkg, and skips without them, or when a credbroker
// package is installed already (it would replace the operator's).
func TestDebianPackage(t *testing.T) {
	o := release(t)
	if _, err := exec.LookPath("dpkg"); err != nil {
		t.Skip("no dpkg: the Debian package is not tested")
	}
	if os.Geteuid() != 0 {
		t.Skip("not root: dpkg -i needs root; the Debian package is not tested")
	}
	if out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", "credbroker").Output(); err == nil && strings.Contains(string(out), "installed") {
		t.Skipf("a credbroker package is installed here (%s): not replacing it", out)
	}
	o.Arches = []string{runtime.GOARCH}
	debs, err := BuildDebs(o)
	if err != nil {
		t.Fatal(err)
	}
	deb := debs[0]
	// Debian sorts 1.0.0~rc1 before 1.0.0: a semver pre-release "-" is "~".
	debVersion := strings.Replace(o.Version, "-", "~", 1)
	if want := "credbroker_" + debVersion + "_" + runtime.GOARCH + ".deb"; filepath.Base(deb) != want {
		t.Errorf("package file %s, want %s", filepath.Base(deb), want)
	}

	// What dpkg-deb reads from the file.
	info := run(t, "dpkg-deb", "--info", deb)
	for _, want := range []string{"Package: credbroker", "Architecture: " + runtime.GOARCH, "Pre-Depends: passwd",
		"conffiles", "preinst", "postinst", "prerm", "postrm"} {
		if !strings.Contains(info, want) {
			t.Errorf("dpkg-deb --info has no %q:\n%s", want, info)
		}
	}
	if got := strings.TrimSpace(run(t, "dpkg-deb", "--field", deb, "Version")); got != debVersion {
		t.Errorf("package version %q, want %s", got, debVersion)
	}
	contents := run(t, "dpkg-deb", "--contents", deb)
	for _, want := range []string{
		"-rwxr-xr-x root/root", "./usr/bin/brokerd", "./usr/bin/brokerctl", "./usr/bin/broker-agent",
		"-rw-r----- root/credbroker", "./etc/credbroker/credbroker.yaml",
		"drwx------ credbroker/credbroker", "./var/lib/credbroker/",
		"./usr/lib/systemd/system/brokerd.service",
	} {
		if !strings.Contains(contents, want) {
			t.Errorf("dpkg-deb --contents has no %q:\n%s", want, contents)
		}
	}

	_, userErr := user.Lookup("credbroker")
	userExisted := userErr == nil
	t.Cleanup(func() {
		// Whatever failed, leave the machine as it was.
		if out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", "credbroker").Output(); err == nil && !strings.Contains(string(out), "not-installed") {
			if out, err := exec.Command("dpkg", "--purge", "credbroker").CombinedOutput(); err != nil {
				t.Errorf("cleanup: dpkg --purge: %v\n%s", err, out)
			}
		}
		if !userExisted {
			_ = exec.Command("userdel", "credbroker").Run()
			_ = exec.Command("groupdel", "credbroker").Run()
		}
	})
	t.Logf("dpkg -i %s:\n%s", filepath.Base(deb), run(t, "dpkg", "-i", deb))

	u, err := user.Lookup("credbroker")
	if err != nil {
		t.Fatalf("no credbroker user after installing: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if uid >= 1000 || uid == 0 {
		t.Errorf("credbroker uid %d: want a system user (1-999)", uid)
	}
	if passwd := run(t, "getent", "passwd", "credbroker"); !strings.HasSuffix(strings.TrimSpace(passwd), ":/var/lib/credbroker:/usr/sbin/nologin") {
		t.Errorf("getent passwd credbroker = %q: want home /var/lib/credbroker, shell nologin", passwd)
	}
	for _, f := range []struct {
		path     string
		mode     os.FileMode
		uid, gid int
	}{
		{"/usr/bin/brokerd", 0o755, 0, 0},
		{"/usr/bin/brokerctl", 0o755, 0, 0},
		{"/usr/bin/broker-agent", 0o755, 0, 0},
		{"/usr/lib/systemd/system/brokerd.service", 0o644, 0, 0},
		{"/etc/credbroker/credbroker.yaml", 0o640, 0, gid},
		{"/var/lib/credbroker", os.ModeDir | 0o700, uid, gid},
		{"/usr/share/doc/credbroker/copyright", 0o644, 0, 0},
	} {
		fi, err := os.Stat(f.path)
		if err != nil {
			t.Error(err)
			continue
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode() != f.mode || int(st.Uid) != f.uid || int(st.Gid) != f.gid {
			t.Errorf("%s: mode %v owner %d:%d, want %v %d:%d", f.path, fi.Mode(), st.Uid, st.Gid, f.mode, f.uid, f.gid)
		}
	}
	if conffiles, _ := os.ReadFile("/var/lib/dpkg/info/credbroker.conffiles"); strings.TrimSpace(string(conffiles)) != "/etc/credbroker/credbroker.yaml" {
		t.Errorf("conffiles = %q, want /etc/credbroker/credbroker.yaml", conffiles)
	}
	if out := run(t, "/usr/bin/brokerd", "--version"); !strings.Contains(out, "v"+o.Version+" (commit "+o.Commit[:12]) {
		t.Errorf("installed brokerd --version = %q, want v%s and commit %s", out, o.Version, o.Commit[:12])
	}
	verifyUnit(t)

	// The installed brokerd, as user credbroker, with the installed
	// configuration pointed at a throwaway PostgreSQL.
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	addr := freeAddr(t)
	example, err := os.ReadFile("/etc/credbroker/credbroker.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("/etc/credbroker/credbroker.yaml", []byte(exampleConfig(t, string(example), tg, addr)), 0o640); err != nil {
		t.Fatal(err)
	}
	pw := "/var/lib/credbroker/main.password"
	if err := os.WriteFile(pw, []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(pw, uid, gid); err != nil {
		t.Fatal(err)
	}
	brokerd := exec.Command("/usr/bin/brokerd", "--config", "/etc/credbroker/credbroker.yaml")
	brokerd.Dir = "/var/lib/credbroker"
	brokerd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	startBrokerd(t, brokerd, addr)
	issueAndLogin(t, func(args ...string) *exec.Cmd { return exec.Command("/usr/bin/brokerctl", args...) }, addr, tg)
	if fi, err := os.Stat("/var/lib/credbroker/leases.db"); err != nil || int(fi.Sys().(*syscall.Stat_t).Uid) != uid {
		t.Errorf("lease store /var/lib/credbroker/leases.db: %v, want it owned by credbroker", err)
	}
	_ = brokerd.Process.Kill()

	// Remove keeps the (changed) conffile and the data; purge removes both.
	t.Logf("dpkg -r credbroker:\n%s", run(t, "dpkg", "-r", "credbroker"))
	for _, gone := range []string{"/usr/bin/brokerd", "/usr/bin/brokerctl", "/usr/bin/broker-agent", "/usr/lib/systemd/system/brokerd.service"} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("after dpkg -r: %s: %v, want it gone", gone, err)
		}
	}
	mustExist(t, "/etc/credbroker/credbroker.yaml", "/var/lib/credbroker/leases.db")
	t.Logf("dpkg -P credbroker:\n%s", run(t, "dpkg", "-P", "credbroker"))
	for _, gone := range []string{"/etc/credbroker", "/var/lib/credbroker"} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("after dpkg -P: %s: %v, want it gone", gone, err)
		}
	}
	if out, _ := exec.Command("dpkg-query", "-W", "-f=${Status}", "credbroker").CombinedOutput(); strings.Contains(string(out), "installed") && !strings.Contains(string(out), "not-installed") {
		t.Errorf("after dpkg -P: dpkg-query says %q", out)
	}
}

// verifyUnit runs systemd-analyze verify on the installed unit, where
// systemd-analyze is, and checks the hardening the package promises.
func verifyUnit(t *testing.T) {
	t.Helper()
	unit, err := os.ReadFile("/usr/lib/systemd/system/brokerd.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ProtectSystem=strict", "NoNewPrivileges=yes", "ReadWritePaths=/var/lib/credbroker",
		"ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "User=credbroker",
		"ExecStart=/usr/bin/brokerd --config /etc/credbroker/credbroker.yaml"} {
		if !strings.Contains(string(unit), "\n"+want+"\n") {
			t.Errorf("brokerd.service has no line %q", want)
		}
	}
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Log("systemd-analyze not found: the unit is not verified")
		return
	}
	out, err := exec.Command("systemd-analyze", "verify", "/usr/lib/systemd/system/brokerd.service").CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze verify brokerd.service: %v\n%s", err, out)
		return
	}
	t.Logf("systemd-analyze verify brokerd.service: ok%s", strings.TrimRight("\n"+string(out), "\n"))
}
