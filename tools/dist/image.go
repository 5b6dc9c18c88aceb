package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The image's user: not root, the uid distroless images call nonroot.
const (
	imageUID  = 65532
	imageUser = "credbroker"
)

// CACertificates is the bundle copied into the image: Debian's
// ca-certificates, which the build machine has installed.
var CACertificates = "/etc/ssl/certs/ca-certificates.crt"

// rootFS is one architecture's file system: the binaries, CA certificates,
// /etc/passwd and /etc/group naming the user, the data directory and /tmp.
// No shell, no package manager, nothing else.
func rootFS(o Options, arch string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdr := func(name string, mode int64, typ byte, uid int, size int64) *tar.Header {
		return &tar.Header{Name: name, Mode: mode, Typeflag: typ, Uid: uid, Gid: uid, Size: size,
			ModTime: o.MTime, Format: tar.FormatPAX}
	}
	dir := func(name string, mode int64, uid int) error {
		return tw.WriteHeader(hdr(name+"/", mode, tar.TypeDir, uid, 0))
	}
	file := func(name string, mode int64, data []byte) error {
		if err := tw.WriteHeader(hdr(name, mode, tar.TypeReg, 0, int64(len(data)))); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	for _, d := range []string{"etc", "etc/credbroker", "etc/ssl", "etc/ssl/certs", "usr", "usr/bin", "var", "var/lib"} {
		if err := dir(d, 0o755, 0); err != nil {
			return nil, err
		}
	}
	if err := dir("tmp", 0o1777, 0); err != nil {
		return nil, err
	}
	if err := dir("var/lib/credbroker", 0o700, imageUID); err != nil {
		return nil, err
	}
	ca, err := os.ReadFile(CACertificates)
	if err != nil {
		return nil, fmt.Errorf("CA certificates (apt-get install ca-certificates): %w", err)
	}
	passwd := fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\n%s:x:%d:%d:credbroker:/var/lib/credbroker:/sbin/nologin\n", imageUser, imageUID, imageUID)
	group := fmt.Sprintf("root:x:0:\n%s:x:%d:\n", imageUser, imageUID)
	for _, f := range []struct {
		name string
		data []byte
	}{{"etc/ssl/certs/ca-certificates.crt", ca}, {"etc/passwd", []byte(passwd)}, {"etc/group", []byte(group)}} {
		if err := file(f.name, 0o644, f.data); err != nil {
			return nil, err
		}
	}
	for _, c := range Commands {
		data, err := os.ReadFile(o.binary(arch, c))
		if err != nil {
			return nil, err
		}
		if err := file("usr/bin/"+c, 0o755, data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Image is one architecture's image.
func Image(o Options, arch string) (v1.Image, error) {
	fsTar, err := rootFS(o, arch)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(fsTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	img, err := mutate.Append(base, mutate.Addendum{Layer: layer, History: v1.History{
		Created: v1.Time{Time: o.MTime}, CreatedBy: "credbroker tools/dist", Comment: "brokerd, brokerctl, broker-agent " + o.Version,
	}})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	cf.Created = v1.Time{Time: o.MTime}
	labels := map[string]string{
		"org.opencontainers.image.title":    "credbroker",
		"org.opencontainers.image.version":  o.Version,
		"org.opencontainers.image.revision": o.Commit,
		"org.opencontainers.image.licenses": "Apache-2.0",
		"org.opencontainers.image.source":   "https://github.com/credbroker/credbroker",
	}
	cf.Config = v1.Config{
		User:         fmt.Sprintf("%d:%d", imageUID, imageUID),
		Entrypoint:   []string{"/usr/bin/brokerd"},
		Cmd:          []string{"--config", "/etc/credbroker/credbroker.yaml"},
		Env:          []string{"PATH=/usr/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"},
		WorkingDir:   "/var/lib/credbroker",
		ExposedPorts: map[string]struct{}{"7450/tcp": {}, "9450/tcp": {}},
		Volumes:      map[string]struct{}{"/var/lib/credbroker": {}},
		Labels:       labels,
	}
	return mutate.ConfigFile(img, cf)
}

// ImageIndex is the multi-architecture index over Image for every arch.
func ImageIndex(o Options) (v1.ImageIndex, error) {
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, arch := range o.Arches {
		img, err := Image(o, arch)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", arch, err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: "linux", Architecture: arch},
		}})
	}
	return idx, nil
}

// BuildImage writes the index as an OCI image layout in a tar file,
// credbroker_<version>_oci.tar in the release directory, loadable with
// `skopeo copy --all oci-archive:...` or `podman load` (which names it
// credbroker:<version>), and returns its path.
func BuildImage(o Options) (string, error) {
	idx, err := ImageIndex(o)
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "credbroker-oci-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return "", err
	}
	if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		// A name and a tag: podman load names the image by it.
		"org.opencontainers.image.ref.name": "credbroker:" + o.Version,
	})); err != nil {
		return "", err
	}
	out := filepath.Join(o.Out, "credbroker_"+o.Version+"_oci.tar")
	return out, tarDir(dir, out, o.MTime)
}

// tarDir writes dir's files into a tar at out, sorted, with one time and
// no owner, so the same layout gives the same bytes.
func tarDir(dir, out string, mtime time.Time) error {
	var names []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		names = append(names, filepath.ToSlash(rel))
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(names)
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	for _, n := range names {
		fi, err := os.Stat(filepath.Join(dir, n))
		if err != nil {
			return err
		}
		h := &tar.Header{Name: n, ModTime: mtime, Mode: 0o644, Format: tar.FormatPAX}
		if fi.IsDir() {
			h.Name, h.Typeflag, h.Mode = n+"/", tar.TypeDir, 0o755
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			continue
		}
		h.Typeflag, h.Size = tar.TypeReg, fi.Size()
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		src, err := os.Open(filepath.Join(dir, n))
		if err != nil {
			return err
		}
		_, err = io.Copy(tw, src)
		src.Close()
		if err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}
