package main

import (
	"bytes"
	"os"
	"reflect"
	"strings"
	"testing"
)

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       []string // nil: an error
	}{
		{"apache", "\n   Apache License\n   Version 2.0, January 2004\n   TERMS AND CONDITIONS", []string{"Apache-2.0"}},
		{"mit", "Copyright (c) 2020 X\n\nPermission is hereby granted, free of charge, to any person\nobtaining a copy ... The above copyright notice and this\npermission notice shall be included in all copies", []string{"MIT"}},
		{"bsd-3", "Redistribution and use in source and binary forms, with or without\nmodification, are permitted ... this list of conditions and the following disclaimer.\n * Neither the name of Google Inc. nor", []string{"BSD-3-Clause"}},
		{"bsd-2", "Redistribution and use in source and binary forms, with or without modification ...\nthis list of conditions and the following disclaimer.", []string{"BSD-2-Clause"}},
		{"isc", "Permission to use, copy, modify, and/or distribute this software for any\npurpose with or without fee is hereby granted", []string{"ISC"}},
		{"mpl names the gpl in its body", "Mozilla Public License Version 2.0\n==================\n1. Definitions\n" + strings.Repeat("1.1. \"Contributor\" means each individual or legal entity that creates ...\n", 5) + "1.12. \"Secondary License\" means either the GNU General Public License, Version 2.0", []string{"MPL-2.0"}},
		{"two in one file", "The MIT License: Permission is hereby granted, free of charge ... The above copyright notice and this permission notice shall be included\n\nApache License Version 2.0", []string{"Apache-2.0", "MIT"}},
		{"gpl quoting a permissive phrase", "GNU GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007\n ... Permission is hereby granted, free of charge; the above copyright notice and this permission notice shall be included", nil},
		{"agpl", "GNU AFFERO GENERAL PUBLIC LICENSE Version 3", nil},
		{"unknown", "All rights reserved. Do not copy.", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Classify(tc.text)
			if tc.want == nil {
				if err == nil {
					t.Fatalf("Classify = %v, want an error", got)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("Classify = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestDisallowed(t *testing.T) {
	mods := []Module{
		{Path: "example.com/ok", Version: "v1.0.0", Licenses: []string{"Apache-2.0", "MIT"}},
		{Path: "example.com/bad", Version: "v0.1.0", Licenses: []string{"MIT", "GPL-3.0"}},
	}
	bad := Disallowed(mods)
	if len(bad) != 1 || !strings.Contains(bad[0], "example.com/bad@v0.1.0: GPL-3.0") {
		t.Fatalf("Disallowed = %q, want one line naming example.com/bad and GPL-3.0", bad)
	}
}

// TestDocsLicensesIsCurrent is the check: every module linked into the
// commands has an allowed license, and docs/licenses.md says so as of now.
func TestDocsLicensesIsCurrent(t *testing.T) {
	mods, err := Modules("../..")
	if err != nil {
		t.Fatal(err)
	}
	if len(mods) < 10 {
		t.Fatalf("Modules found %d modules; the commands link dozens", len(mods))
	}
	for _, m := range mods {
		if m.Path == "github.com/credbroker/credbroker" {
			t.Errorf("the main module is listed")
		}
	}
	if bad := Disallowed(mods); len(bad) > 0 {
		t.Fatalf("licenses not allowed:\n%s", strings.Join(bad, "\n"))
	}
	cur, err := os.ReadFile("../../" + outputPath)
	if err != nil {
		t.Fatal(err)
	}
	if want := Render(mods); !bytes.Equal(cur, want) {
		t.Fatalf("%s is stale: run `go run ./tools/licenses` (or `make licenses`) and commit it", outputPath)
	}
}
