// Command licenses lists the license of every module linked into
// credbroker's commands and checks that each one allows distributing them
// under Apache-2.0. It writes docs/licenses.md:
//
//	go run ./tools/licenses            # regenerate docs/licenses.md
//	go run ./tools/licenses -check     # fail if it is stale or a license is not allowed
//
// The modules are those of the packages `go list -deps` finds for ./cmd/...
// built for linux/amd64 and linux/arm64 (what the release ships), not the
// test-only ones. Each module's license files (LICENSE*, LICENCE*, COPYING*
// in the module's root) are classified by their text; a license this
// program does not recognise, or one outside Allowed, is an error.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// Allowed are the licenses whose code may be linked into a program
// distributed under Apache-2.0: the permissive ones, and MPL-2.0, whose
// copyleft stays with its own files (HashiCorp's Vault client and its
// helpers use it). GPL, LGPL, AGPL, SSPL, BUSL and unknown texts are not.
var Allowed = map[string]bool{
	"Apache-2.0":   true,
	"BSD-2-Clause": true,
	"BSD-3-Clause": true,
	"ISC":          true,
	"MIT":          true,
	"MPL-2.0":      true,
}

// Platforms are the GOOS/GOARCH pairs the release builds; a module linked
// on any of them is listed.
var Platforms = []string{"linux/amd64", "linux/arm64"}

// Packages are the commands whose dependencies are listed.
var Packages = []string{"./cmd/..."}

const outputPath = "docs/licenses.md"

// Module is one dependency and what its license files say.
type Module struct {
	Path, Version string
	Files         []string // license file names in the module's root
	Licenses      []string // identifiers, sorted, one or more
}

// markers recognise a license by phrases of its text, in order: the first
// whose every phrase occurs (after folding white space) names the license.
// BSD-3-Clause is tried before BSD-2-Clause, whose phrases it contains.
var markers = []struct {
	id      string
	phrases []string
}{
	{"Apache-2.0", []string{"apache license", "version 2.0"}},
	{"MPL-2.0", []string{"mozilla public license", "2.0"}},
	{"BSD-3-Clause", []string{"redistribution and use in source and binary forms", "neither the name"}},
	{"BSD-3-Clause", []string{"redistribution and use in source and binary forms", "names of its contributors may be used"}},
	{"BSD-2-Clause", []string{"redistribution and use in source and binary forms", "this list of conditions and the following disclaimer"}},
	{"MIT", []string{"permission is hereby granted, free of charge", "the above copyright notice and this permission notice shall be included"}},
	{"ISC", []string{"permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is hereby granted"}},
}

// copyleft titles in a text's first lines make it refused even when a
// permissive license's phrases also occur further on, so a GPL text quoting
// another license is never mistaken for it. Only the title counts: MPL-2.0
// names the GPL family in its body, as its "Secondary Licenses".
var copyleft = []string{"gnu general public license", "gnu lesser general public license", "gnu affero general public license", "server side public license", "business source license"}

var spaces = regexp.MustCompile(`[\s*#]+`)

// Classify names the licenses in one license file's text. A file may hold
// several (gopkg.in/yaml.v3: MIT and Apache-2.0); it is an error when it
// holds none this program recognises, or a copyleft one.
func Classify(text string) ([]string, error) {
	t := strings.ToLower(spaces.ReplaceAllString(text, " "))
	title := t[:min(len(t), 300)]
	for _, c := range copyleft {
		if strings.Contains(title, c) {
			return nil, fmt.Errorf("copyleft license text (%q)", c)
		}
	}
	seen := map[string]bool{}
	var ids []string
	bsd := false
	for _, m := range markers {
		ok := true
		for _, p := range m.phrases {
			if !strings.Contains(t, p) {
				ok = false
				break
			}
		}
		if !ok || seen[m.id] {
			continue
		}
		if m.id == "BSD-2-Clause" && bsd {
			continue
		}
		if strings.HasPrefix(m.id, "BSD-") {
			bsd = true
		}
		seen[m.id] = true
		ids = append(ids, m.id)
	}
	if len(ids) == 0 {
		return nil, errors.New("no license recognised")
	}
	sort.Strings(ids)
	return ids, nil
}

var licenseFile = regexp.MustCompile(`(?i)^(licen[cs]e|copying|unlicense)([._-].*)?$`)

// Modules lists the modules linked into Packages on Platforms, with their
// licenses. It runs `go list` in dir (the main module's root).
func Modules(dir string) ([]Module, error) {
	type entry struct{ version, dir string }
	found := map[string]entry{}
	for _, pl := range Platforms {
		goos, goarch, _ := strings.Cut(pl, "/")
		args := append([]string{"list", "-deps", "-f",
			"{{with .Module}}{{if not .Main}}{{.Path}}\t{{.Version}}\t{{with .Replace}}{{.Dir}}{{else}}{{.Dir}}{{end}}{{end}}{{end}}"}, Packages...)
		cmd := exec.Command("go", args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GOOS="+goos, "GOARCH="+goarch, "CGO_ENABLED=0", "GOFLAGS=-mod=readonly")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("go list for %s: %v: %s", pl, err, stderr.Bytes())
		}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if line == "" {
				continue
			}
			f := strings.Split(line, "\t")
			if len(f) != 3 || f[2] == "" {
				return nil, fmt.Errorf("go list: unexpected line %q (is the module downloaded?)", line)
			}
			found[f[0]] = entry{f[1], f[2]}
		}
	}
	var mods []Module
	for path, e := range found {
		m := Module{Path: path, Version: e.version}
		ents, err := os.ReadDir(e.dir)
		if err != nil {
			return nil, err
		}
		seen := map[string]bool{}
		for _, de := range ents {
			if de.IsDir() || !licenseFile.MatchString(de.Name()) {
				continue
			}
			text, err := os.ReadFile(filepath.Join(e.dir, de.Name()))
			if err != nil {
				return nil, err
			}
			ids, err := Classify(string(text))
			if err != nil {
				return nil, fmt.Errorf("%s@%s %s: %v", path, e.version, de.Name(), err)
			}
			m.Files = append(m.Files, de.Name())
			for _, id := range ids {
				if !seen[id] {
					seen[id] = true
					m.Licenses = append(m.Licenses, id)
				}
			}
		}
		if len(m.Files) == 0 {
			return nil, fmt.Errorf("%s@%s: no license file in %s", path, e.version, e.dir)
		}
		sort.Strings(m.Licenses)
		mods = append(mods, m)
	}
	sort.Slice(mods, func(i, j int) bool { return mods[i].Path < mods[j].Path })
	return mods, nil
}

// Disallowed returns one line per module with a license outside Allowed.
func Disallowed(mods []Module) []string {
	var bad []string
	for _, m := range mods {
		for _, l := range m.Licenses {
			if !Allowed[l] {
				bad = append(bad, fmt.Sprintf("%s@%s: %s is not allowed", m.Path, m.Version, l))
			}
		}
	}
	return bad
}

// Render is the text of docs/licenses.md.
func Render(mods []Module) []byte {
	var allowed []string
	for l := range Allowed {
		allowed = append(allowed, l)
	}
	sort.Strings(allowed)
	var b bytes.Buffer
	b.WriteString("# Licenses of credbroker's dependencies\n\n")
	b.WriteString("credbroker is distributed under the Apache License 2.0 ([LICENSE](../LICENSE)). These are\n")
	fmt.Fprintf(&b, "the modules linked into its commands (`go list -deps %s` for %s),\n",
		strings.Join(Packages, " "), strings.Join(Platforms, " and "))
	b.WriteString("each with the licenses its license files carry. Test-only dependencies are not linked\n")
	b.WriteString("and not listed. The Go standard library and runtime in every binary are BSD-3-Clause.\n\n")
	b.WriteString("Generated by `go run ./tools/licenses` (or `make licenses`); do not edit.\n")
	b.WriteString("`go test ./tools/licenses` (part of `make test`) fails when this file is stale or when a\n")
	fmt.Fprintf(&b, "license is not one of: %s.\n\n", strings.Join(allowed, ", "))
	b.WriteString("| module | version | license | file |\n|---|---|---|---|\n")
	for _, m := range mods {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", m.Path, m.Version, strings.Join(m.Licenses, " AND "), strings.Join(m.Files, ", "))
	}
	return b.Bytes()
}

func main() {
	check := flag.Bool("check", false, "do not write: exit 1 if "+outputPath+" is stale or a license is not allowed")
	flag.Parse()
	if err := run(*check); err != nil {
		fmt.Fprintln(os.Stderr, "licenses:", err)
		os.Exit(1)
	}
}

func run(check bool) error {
	mods, err := Modules(".")
	if err != nil {
		return err
	}
	if bad := Disallowed(mods); len(bad) > 0 {
		return errors.New(strings.Join(bad, "\n"))
	}
	text := Render(mods)
	if check {
		cur, err := os.ReadFile(outputPath)
		if err != nil {
			return err
		}
		if !bytes.Equal(cur, text) {
			return fmt.Errorf("%s is stale: run go run ./tools/licenses", outputPath)
		}
		return nil
	}
	return os.WriteFile(outputPath, text, 0o644)
}
