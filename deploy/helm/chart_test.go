// Package helm_test checks the Helm chart deploy/helm/credbroker with the
// Helm that `make helm` builds (CREDBROKER_HELM_BIN, which make test sets):
// helm lint, and assertions on what helm template renders.
package helm_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/credbroker/credbroker/internal/testpki"
	"github.com/credbroker/credbroker/server/config"
	"gopkg.in/yaml.v3"
)

const chart = "credbroker"

// required are the values without which the chart refuses to render.
var required = []string{"--set", "tls.secretName=credbroker-tls", "--set", "adminPasswords.secretName=credbroker-admin", "--set", "tls.clientCA=true"}

func helmBin(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("CREDBROKER_HELM_BIN")
	if bin == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("CREDBROKER_HELM_BIN is not set: run make test (make helm builds Helm)")
		}
		t.Skip("CREDBROKER_HELM_BIN is not set: the chart is not checked (make test sets it; make helm builds Helm)")
	}
	return bin
}

func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(helmBin(t), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), errors.New(err.Error() + ": " + stderr.String() + stdout.String())
	}
	return stdout.String(), nil
}

// object is one rendered manifest.
type object = map[string]any

func kindOf(o object) string { return str(o["kind"]) }
func nameOf(o object) string { return str(get(o, "metadata", "name")) }

func get(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func str(v any) string { s, _ := v.(string); return s }

func list(v any) []map[string]any {
	var out []map[string]any
	l, _ := v.([]any)
	for _, e := range l {
		if m, ok := e.(map[string]any); ok {
			out = append(out, m)
		}
	}
	return out
}

func render(t *testing.T, args ...string) ([]object, error) {
	t.Helper()
	out, err := helm(t, append([]string{"template", "r", chart}, args...)...)
	if err != nil {
		return nil, err
	}
	var objs []object
	dec := yaml.NewDecoder(strings.NewReader(out))
	for {
		var o object
		if err := dec.Decode(&o); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("helm template printed YAML that does not parse: %v", err)
		}
		if o != nil {
			objs = append(objs, o)
		}
	}
	return objs, nil
}

func mustRender(t *testing.T, args ...string) []object {
	t.Helper()
	objs, err := render(t, append(append([]string{}, required...), args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

func find(t *testing.T, objs []object, kind, name string) object {
	t.Helper()
	for _, o := range objs {
		if kindOf(o) == kind && nameOf(o) == name {
			return o
		}
	}
	t.Fatalf("no %s %s rendered", kind, name)
	return nil
}

func count(objs []object, kind string) int {
	n := 0
	for _, o := range objs {
		if kindOf(o) == kind {
			n++
		}
	}
	return n
}

// brokerdConfig is the brokerd configuration in the ConfigMap.
func brokerdConfig(t *testing.T, objs []object) map[string]any {
	t.Helper()
	cm := find(t, objs, "ConfigMap", "r-credbroker")
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(str(get(cm, "data", "credbroker.yaml"))), &cfg); err != nil {
		t.Fatalf("the ConfigMap's credbroker.yaml: %v", err)
	}
	return cfg
}

func TestLint(t *testing.T) {
	out, err := helm(t, append([]string{"lint", "--strict", chart}, required...)...)
	if err != nil {
		t.Fatalf("helm lint: %v", err)
	}
	if !strings.Contains(out, "0 chart(s) failed") {
		t.Fatalf("helm lint: %s", out)
	}
	// helm lint only notes a missing required value; helm template (and
	// install) refuse.
	if _, err := render(t, "--set", "adminPasswords.secretName=credbroker-admin"); err == nil || !strings.Contains(err.Error(), "tls.secretName is required") {
		t.Fatalf("helm template without tls.secretName: %v, want the chart to refuse", err)
	}
	if _, err := render(t, "--set", "tls.secretName=credbroker-tls"); err == nil || !strings.Contains(err.Error(), "adminPasswords.secretName is required") {
		t.Fatalf("helm template without adminPasswords.secretName: %v, want the chart to refuse", err)
	}
	if _, err := render(t, "--set", "tls.secretName=credbroker-tls", "--set", "adminPasswords.secretName=credbroker-admin"); err == nil || !strings.Contains(err.Error(), "tls.clientCA (client certificates) or config.tokens") {
		t.Fatalf("helm template with no way to authenticate callers: %v, want the chart to refuse", err)
	}
}

// TestRenderedConfigIsValid: brokerd's own validation accepts the
// configuration the chart renders, with the Secrets' and the volume's
// files where the pod would have them (here under a temporary directory).
func TestRenderedConfigIsValid(t *testing.T) {
	for name, args := range map[string][]string{
		"client certificates": nil,
		"tokens": {"--set", "tls.clientCA=false", "--set", "config.tokens[0].identity=orders",
			"--set", "config.tokens[0].sha256=" + strings.Repeat("ab", 32), "--set", "config.admins={orders}"},
		"three replicas on etcd": {"--set", "replicas=3", "--set", "store.etcd.endpoints={https://etcd-0:2379,https://etcd-1:2379}",
			"--set", "store.etcd.prefix=/credbroker/", "--set", "store.etcd.session_ttl=10s"},
		"etcd with TLS and a password": {"--set", "replicas=2", "--set", "store.etcd.endpoints={https://etcd-0:2379}",
			"--set", "store.etcdSecret.secretName=etcd-client", "--set", "store.etcdSecret.username=credbroker"},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := brokerdConfig(t, mustRender(t, args...))
			dir := t.TempDir()
			b, err := yaml.Marshal(cfg)
			if err != nil {
				t.Fatal(err)
			}
			text := strings.NewReplacer("/etc/credbroker/", dir+"/etc/", "/var/lib/credbroker/", dir+"/data/").Replace(string(b))
			for _, d := range []string{"etc/tls", "etc/passwords", "data"} {
				if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
					t.Fatal(err)
				}
			}
			ca := testpki.NewCA(t, "chart")
			cert, key := ca.Issue(t, testpki.Leaf{CN: "credbroker", Server: true})
			for file, data := range map[string][]byte{"etc/tls/tls.crt": cert, "etc/tls/tls.key": key, "etc/tls/ca.crt": ca.PEM, "etc/passwords/main": []byte("secret")} {
				if err := os.WriteFile(filepath.Join(dir, file), data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			f, err := config.Parse([]byte(text))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.Validate(); err != nil {
				t.Fatalf("brokerd refuses the chart's configuration:\n%v\n%s", err, text)
			}
		})
	}
}

// TestSingleReplicaOnBbolt: the default is one brokerd with its lease
// store on a PersistentVolumeClaim, its configuration from the ConfigMap,
// the admin passwords and the TLS key from Secrets, read-only, as a
// non-root user.
func TestSingleReplicaOnBbolt(t *testing.T) {
	objs := mustRender(t)
	d := find(t, objs, "Deployment", "r-credbroker")
	if r, _ := get(d, "spec", "replicas").(int); r != 1 {
		t.Errorf("replicas = %v, want 1", get(d, "spec", "replicas"))
	}
	if s := str(get(d, "spec", "strategy", "type")); s != "Recreate" {
		t.Errorf("strategy %q, want Recreate (bbolt's file lock)", s)
	}
	find(t, objs, "PersistentVolumeClaim", "r-credbroker-data")
	pod := get(d, "spec", "template", "spec")
	checkNonRoot(t, "brokerd", pod)
	volumes := map[string]map[string]any{}
	for _, v := range list(get(pod, "volumes")) {
		volumes[str(v["name"])] = v
	}
	if claim := str(get(volumes["data"], "persistentVolumeClaim", "claimName")); claim != "r-credbroker-data" {
		t.Errorf("volume data: %v, want the PVC r-credbroker-data", volumes["data"])
	}
	if cm := str(get(volumes["config"], "configMap", "name")); cm != "r-credbroker" {
		t.Errorf("volume config: %v, want the ConfigMap", volumes["config"])
	}
	secrets := map[string]string{"tls": "credbroker-tls", "passwords": "credbroker-admin"}
	for vol, secret := range secrets {
		if got := str(get(volumes[vol], "secret", "secretName")); got != secret {
			t.Errorf("volume %s: %v, want Secret %s", vol, volumes[vol], secret)
		}
	}
	c := list(get(pod, "containers"))[0]
	mounts := map[string]map[string]any{}
	for _, m := range list(c["volumeMounts"]) {
		mounts[str(m["name"])] = m
	}
	for _, vol := range []string{"tls", "passwords", "config"} {
		if ro, _ := mounts[vol]["readOnly"].(bool); !ro {
			t.Errorf("brokerd mounts %s %v: want readOnly", vol, mounts[vol])
		}
	}
	if mp := str(mounts["data"]["mountPath"]); mp != "/var/lib/credbroker" {
		t.Errorf("data mounted at %q, want /var/lib/credbroker", mp)
	}

	cfg := brokerdConfig(t, objs)
	if p := str(get(cfg, "store", "path")); p != "/var/lib/credbroker/leases.db" {
		t.Errorf("store.path = %q", p)
	}
	if p := str(get(cfg, "targets", 0, "password_file")); p != "/etc/credbroker/passwords/main" || !strings.HasPrefix(p, str(mounts["passwords"]["mountPath"])+"/") {
		t.Errorf("targets[0].password_file = %q, want it in the passwords Secret's mount", p)
	}
	if cert := str(get(cfg, "tls", "cert_file")); !strings.HasPrefix(cert, str(mounts["tls"]["mountPath"])+"/") {
		t.Errorf("tls.cert_file = %q, want it in the TLS Secret's mount %v", cert, mounts["tls"]["mountPath"])
	}
	if l := str(get(cfg, "metrics", "listen")); l != "0.0.0.0:9450" {
		t.Errorf("metrics.listen = %q", l)
	}
	if n := count(objs, "ServiceMonitor"); n != 0 {
		t.Errorf("%d ServiceMonitors rendered by default, want none", n)
	}
	if n := count(objs, "Deployment"); n != 1 {
		t.Errorf("%d Deployments by default, want brokerd's only (the example app is off)", n)
	}
}

// TestSeveralReplicasOnEtcd: with store.etcd, no volume and as many
// replicas as asked; without it, more than one replica is refused.
func TestSeveralReplicasOnEtcd(t *testing.T) {
	objs := mustRender(t, "--set", "replicas=3", "--set", "store.etcd.endpoints={https://etcd-0:2379,https://etcd-1:2379}",
		"--set", "store.etcd.prefix=/credbroker/")
	d := find(t, objs, "Deployment", "r-credbroker")
	if r, _ := get(d, "spec", "replicas").(int); r != 3 {
		t.Errorf("replicas = %v, want 3", get(d, "spec", "replicas"))
	}
	if n := count(objs, "PersistentVolumeClaim"); n != 0 {
		t.Errorf("%d PVCs with store.etcd, want none", n)
	}
	cfg := brokerdConfig(t, objs)
	if get(cfg, "store", "path") != nil || str(get(cfg, "store", "etcd", "endpoints", 1)) != "https://etcd-1:2379" || str(get(cfg, "store", "etcd", "prefix")) != "/credbroker/" {
		t.Errorf("store = %v, want etcd only", cfg["store"])
	}
	if _, err := render(t, append(append([]string{}, required...), "--set", "replicas=2")...); err == nil || !strings.Contains(err.Error(), "replicas > 1 needs store.etcd") {
		t.Errorf("2 replicas on bbolt: %v, want the chart to refuse", err)
	}
	if get(cfg, "store", "etcd", "tls") != nil || get(cfg, "store", "etcd", "password_file") != nil {
		t.Errorf("store.etcd = %v without store.etcdSecret, want no tls and no password_file", get(cfg, "store", "etcd"))
	}
}

// TestEtcdSecret: store.etcdSecret is mounted read-only and its files
// become store.etcd.tls and, with a username, store.etcd.password_file.
func TestEtcdSecret(t *testing.T) {
	objs := mustRender(t, "--set", "replicas=2", "--set", "store.etcd.endpoints={https://etcd-0:2379}",
		"--set", "store.etcdSecret.secretName=etcd-client", "--set", "store.etcdSecret.username=credbroker")
	pod := get(find(t, objs, "Deployment", "r-credbroker"), "spec", "template", "spec")
	var vol map[string]any
	for _, v := range list(get(pod, "volumes")) {
		if str(v["name"]) == "etcd" {
			vol = v
		}
	}
	if str(get(vol, "secret", "secretName")) != "etcd-client" {
		t.Fatalf("volume etcd = %v, want the Secret etcd-client", vol)
	}
	var mount map[string]any
	for _, m := range list(get(list(get(pod, "containers"))[0], "volumeMounts")) {
		if str(m["name"]) == "etcd" {
			mount = m
		}
	}
	if ro, _ := mount["readOnly"].(bool); !ro || str(mount["mountPath"]) != "/etc/credbroker/etcd" {
		t.Fatalf("etcd mount = %v, want read-only at /etc/credbroker/etcd", mount)
	}
	cfg := brokerdConfig(t, objs)
	want := map[string]string{"ca_file": "ca.crt", "cert_file": "tls.crt", "key_file": "tls.key"}
	for key, file := range want {
		if got := str(get(cfg, "store", "etcd", "tls", key)); got != "/etc/credbroker/etcd/"+file {
			t.Errorf("store.etcd.tls.%s = %q, want the Secret's %s", key, got, file)
		}
	}
	if u, p := str(get(cfg, "store", "etcd", "username")), str(get(cfg, "store", "etcd", "password_file")); u != "credbroker" || p != "/etc/credbroker/etcd/password" {
		t.Errorf("store.etcd username %q password_file %q", u, p)
	}
	// TLS only: no username, no password file.
	cfg = brokerdConfig(t, mustRender(t, "--set", "store.etcd.endpoints={https://etcd-0:2379}", "--set", "store.etcdSecret.secretName=etcd-client"))
	if get(cfg, "store", "etcd", "password_file") != nil || str(get(cfg, "store", "etcd", "tls", "ca_file")) == "" {
		t.Errorf("store.etcd = %v, want tls and no password_file", get(cfg, "store", "etcd"))
	}
}

func TestServiceMonitorToggle(t *testing.T) {
	sm := find(t, mustRender(t, "--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor", "r-credbroker")
	if p := str(get(sm, "spec", "endpoints", 0, "port")); p != "metrics" {
		t.Errorf("ServiceMonitor scrapes port %q, want metrics", p)
	}
	objs := mustRender(t, "--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true")
	if n := count(objs, "ServiceMonitor"); n != 0 {
		t.Errorf("metrics off: %d ServiceMonitors, want none", n)
	}
	if cfg := brokerdConfig(t, objs); cfg["metrics"] != nil {
		t.Errorf("metrics off: config has metrics %v", cfg["metrics"])
	}
}

// TestExampleAppSidecar: broker-agent runs as a native sidecar of the
// example app, writing the credential into an emptyDir the app mounts
// read-only, both as non-root.
func TestExampleAppSidecar(t *testing.T) {
	objs := mustRender(t, "--set", "exampleApp.enabled=true")
	pod := get(find(t, objs, "Deployment", "orders"), "spec", "template", "spec")
	checkNonRoot(t, "orders", pod)
	var shared string
	for _, v := range list(get(pod, "volumes")) {
		if v["name"] == "db-credential" {
			if _, ok := v["emptyDir"]; !ok {
				t.Fatalf("volume db-credential %v: want an emptyDir", v)
			}
			shared = "db-credential"
		}
	}
	if shared == "" {
		t.Fatal("no db-credential volume")
	}
	agents := list(get(pod, "initContainers"))
	if len(agents) != 1 || agents[0]["name"] != "broker-agent" || agents[0]["restartPolicy"] != "Always" {
		t.Fatalf("initContainers %v: want broker-agent as a native sidecar (restartPolicy: Always)", agents)
	}
	agentMount := mountOf(agents[0], shared)
	if agentMount == nil || agentMount["readOnly"] == true {
		t.Fatalf("broker-agent mounts %s %v: want it writable", shared, agentMount)
	}
	var out string
	for _, a := range agents[0]["args"].([]any) {
		if s := str(a); strings.HasPrefix(s, "--out=") {
			out = strings.TrimPrefix(s, "--out=")
		}
	}
	if !strings.HasPrefix(out, str(agentMount["mountPath"])+"/") {
		t.Errorf("broker-agent --out=%s is not in the shared volume at %v", out, agentMount["mountPath"])
	}
	app := list(get(pod, "containers"))[0]
	appMount := mountOf(app, shared)
	if appMount == nil || appMount["readOnly"] != true || appMount["mountPath"] != agentMount["mountPath"] {
		t.Errorf("app mounts %s %v: want it read-only where the agent writes", shared, appMount)
	}
	for _, c := range []map[string]any{agents[0], app} {
		if get(c, "securityContext", "allowPrivilegeEscalation") != false {
			t.Errorf("%s: allowPrivilegeEscalation is not false", c["name"])
		}
	}
	if !strings.HasPrefix(str(agents[0]["image"]), "registry.example.com/credbroker:") || str(get(agents[0], "command", 0)) != "/usr/bin/broker-agent" {
		t.Errorf("the sidecar runs %v %v, want broker-agent from the credbroker image", agents[0]["image"], agents[0]["command"])
	}
}

func mountOf(container map[string]any, volume string) map[string]any {
	for _, m := range list(container["volumeMounts"]) {
		if m["name"] == volume {
			return m
		}
	}
	return nil
}

// checkNonRoot: the pod runs as a non-root user, and every container
// drops privilege escalation.
func checkNonRoot(t *testing.T, what string, pod any) {
	t.Helper()
	if get(pod, "securityContext", "runAsNonRoot") != true {
		t.Errorf("%s: runAsNonRoot is not true: %v", what, get(pod, "securityContext"))
	}
	if uid, _ := get(pod, "securityContext", "runAsUser").(int); uid == 0 {
		t.Errorf("%s: runAsUser %v, want a non-root uid", what, get(pod, "securityContext", "runAsUser"))
	}
	for _, c := range list(get(pod, "containers")) {
		if get(c, "securityContext", "allowPrivilegeEscalation") != false {
			t.Errorf("%s: container %s allows privilege escalation", what, c["name"])
		}
	}
}
