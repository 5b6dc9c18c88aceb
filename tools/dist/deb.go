package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/goreleaser/nfpm/v2"
	_ "github.com/goreleaser/nfpm/v2/deb" // registers the deb packager
	"github.com/goreleaser/nfpm/v2/files"
)

// DebInfo is the package's description for one architecture: what goes
// where, with which owner and mode. The files under deploy/debian are the
// unit, the example configuration and the maintainer scripts.
func DebInfo(o Options, arch string) *nfpm.Info {
	deb := filepath.Join(o.Root, "deploy", "debian")
	file := func(src, dst string, mode os.FileMode) *files.Content {
		return &files.Content{Source: src, Destination: dst,
			FileInfo: &files.ContentFileInfo{Owner: "root", Group: "root", Mode: mode, MTime: o.MTime}}
	}
	var contents files.Contents
	for _, c := range Commands {
		contents = append(contents, file(o.binary(arch, c), "/usr/bin/"+c, 0o755))
	}
	contents = append(contents,
		file(filepath.Join(deb, "brokerd.service"), "/usr/lib/systemd/system/brokerd.service", 0o644),
		file(filepath.Join(o.Root, "LICENSE"), "/usr/share/doc/credbroker/copyright", 0o644),
		file(filepath.Join(o.Root, "README.md"), "/usr/share/doc/credbroker/README.md", 0o644),
		file(filepath.Join(o.Root, "docs", "security.md"), "/usr/share/doc/credbroker/security.md", 0o644),
		file(filepath.Join(o.Root, "docs", "licenses.md"), "/usr/share/doc/credbroker/licenses.md", 0o644),
		// A conffile: dpkg keeps the operator's edits on upgrade and
		// removes it on purge. Group credbroker (made by preinst) reads it.
		&files.Content{Source: filepath.Join(deb, "credbroker.yaml"), Destination: "/etc/credbroker/credbroker.yaml",
			Type:     files.TypeConfig,
			FileInfo: &files.ContentFileInfo{Owner: "root", Group: "credbroker", Mode: 0o640, MTime: o.MTime}},
		&files.Content{Destination: "/var/lib/credbroker", Type: files.TypeDir,
			FileInfo: &files.ContentFileInfo{Owner: "credbroker", Group: "credbroker", Mode: 0o700, MTime: o.MTime}},
	)
	info := &nfpm.Info{
		Name:        "credbroker",
		Arch:        arch,
		Platform:    "linux",
		Version:     o.Version,
		Section:     "admin",
		Priority:    "optional",
		Maintainer:  "credbroker maintainers",
		Description: "short-lived PostgreSQL users on request (brokerd, brokerctl, broker-agent)\nA gRPC service that issues each caller a new PostgreSQL LOGIN user in a\nproxy role, records a lease for it, and drops the user, ending its\nsessions, when the lease expires or is revoked.",
		Homepage:    "https://github.com/credbroker/credbroker",
		License:     "Apache-2.0",
		MTime:       o.MTime,
		Overridables: nfpm.Overridables{
			Contents: contents,
			Scripts: nfpm.Scripts{
				PreInstall:  filepath.Join(deb, "preinst"),
				PostInstall: filepath.Join(deb, "postinst"),
				PreRemove:   filepath.Join(deb, "prerm"),
				PostRemove:  filepath.Join(deb, "postrm"),
			},
			Deb: nfpm.Deb{Predepends: []string{"passwd"}},
		},
	}
	return info
}

// BuildDebs writes credbroker_<version>_<arch>.deb into the release
// directory for every architecture and returns their paths.
func BuildDebs(o Options) ([]string, error) {
	pkg, err := nfpm.Get("deb")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, arch := range o.Arches {
		info := nfpm.WithDefaults(DebInfo(o, arch))
		if err := nfpm.PrepareForPackager(info, "deb"); err != nil {
			return nil, fmt.Errorf("deb %s: %w", arch, err)
		}
		path := filepath.Join(o.Out, pkg.ConventionalFileName(info))
		f, err := os.Create(path)
		if err != nil {
			return nil, err
		}
		info.Target = path
		if err := pkg.Package(info, f); err != nil {
			f.Close()
			os.Remove(path)
			return nil, fmt.Errorf("deb %s: %w", arch, err)
		}
		if err := f.Close(); err != nil {
			return nil, err
		}
		out = append(out, path)
	}
	return out, nil
}
