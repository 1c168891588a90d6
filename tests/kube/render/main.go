// chart-render renders a Helm (v3) chart the way `helm template` does, for the machines
// where helm itself cannot be installed (Debian ships no helm). It is built from Debian's
// Go packages only (tests/kube/build-render.sh) and covers what Helm's template engine
// offers a chart:
//
//   - Go's text/template with missingkey=zero, "<no value>" removed from the output;
//   - the sprig v3 function library without env/expandenv, as Helm registers it;
//   - Helm's own functions: include, tpl, required, fail, toYaml, fromYaml, fromYamlArray,
//     toJson, fromJson, fromJsonArray, lookup (always empty, as in `helm template`);
//   - the built-in objects .Values, .Release, .Chart, .Capabilities, .Template, .Files;
//   - values.yaml coalesced with -f files (maps merged key by key, later files win, a null
//     removes a key); numbers are float64, as Helm's YAML-through-JSON decoding makes them.
//
// Not covered (the chart must not rely on them): subcharts and dependencies, --set,
// values.schema.json, hooks ordering, post-renderers. Every rendered document is parsed as
// YAML and must carry apiVersion and kind, so a template that emits broken YAML fails here
// as `helm install` would.
//
// Usage: chart-render [-f values.yaml]... [--name R] [--namespace NS] [--kube-version V]
//
//	[--api-versions G/V]... [--include-crds] [--notes] CHART_DIR
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig/v3"
	"github.com/ghodss/yaml"
)

// Metadata is Chart.yaml as a template sees it (.Chart.Name, .Chart.AppVersion, ...).
type Metadata struct {
	APIVersion   string              `json:"apiVersion"`
	Name         string              `json:"name"`
	Version      string              `json:"version"`
	AppVersion   string              `json:"appVersion,omitempty"`
	Description  string              `json:"description,omitempty"`
	Type         string              `json:"type,omitempty"`
	Home         string              `json:"home,omitempty"`
	Sources      []string            `json:"sources,omitempty"`
	Keywords     []string            `json:"keywords,omitempty"`
	KubeVersion  string              `json:"kubeVersion,omitempty"`
	Icon         string              `json:"icon,omitempty"`
	Deprecated   bool                `json:"deprecated,omitempty"`
	Annotations  map[string]string   `json:"annotations,omitempty"`
	Maintainers  []map[string]string `json:"maintainers,omitempty"`
	Dependencies []interface{}       `json:"dependencies,omitempty"`
}

// KubeVersion is .Capabilities.KubeVersion.
type KubeVersion struct {
	Version    string
	Major      string
	Minor      string
	GitVersion string
}

func (k KubeVersion) String() string { return k.Version }

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

// Has tells whether "group/version" or "group/version/Kind" is served.
func (v VersionSet) Has(s string) bool {
	for _, x := range v {
		if x == s {
			return true
		}
	}
	return false
}

// Capabilities is .Capabilities.
type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
	HelmVersion map[string]string
}

// Files is .Files: the chart's files outside templates/.
type Files map[string][]byte

// Get returns a file's text, or "" when there is no such file.
func (f Files) Get(name string) string { return string(f[name]) }

// GetBytes returns a file's bytes.
func (f Files) GetBytes(name string) []byte { return f[name] }

// Glob returns the files whose path matches a shell pattern.
func (f Files) Glob(pattern string) Files {
	out := Files{}
	for k, v := range f {
		if ok, _ := path.Match(pattern, k); ok {
			out[k] = v
		}
	}
	return out
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(s string) error { *m = append(*m, s); return nil }

// The group/versions a Kubernetes 1.20 API server serves out of the box.
var builtinAPIVersions = []string{
	"v1", "admissionregistration.k8s.io/v1", "admissionregistration.k8s.io/v1beta1",
	"apiextensions.k8s.io/v1", "apiextensions.k8s.io/v1beta1", "apps/v1",
	"authentication.k8s.io/v1", "authorization.k8s.io/v1", "autoscaling/v1", "autoscaling/v2beta1",
	"autoscaling/v2beta2", "batch/v1", "batch/v1beta1", "certificates.k8s.io/v1",
	"coordination.k8s.io/v1", "discovery.k8s.io/v1beta1", "events.k8s.io/v1",
	"networking.k8s.io/v1", "node.k8s.io/v1", "policy/v1beta1",
	"rbac.authorization.k8s.io/v1", "scheduling.k8s.io/v1", "storage.k8s.io/v1",
	"storage.k8s.io/v1beta1",
}

func main() {
	var valueFiles, apiVersions multiFlag
	flag.Var(&valueFiles, "f", "values file (repeatable; later files win)")
	flag.Var(&apiVersions, "api-versions", "extra group/version for .Capabilities.APIVersions (repeatable)")
	name := flag.String("name", "cinderblock", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kubeVersion := flag.String("kube-version", "v1.20.2", "Kubernetes version for .Capabilities")
	includeCRDs := flag.Bool("include-crds", false, "also print the chart's crds/ files, first")
	notes := flag.Bool("notes", false, "print the rendered NOTES.txt instead of the manifests")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: chart-render [-f values.yaml]... [flags] CHART_DIR")
		os.Exit(2)
	}
	out, err := render(flag.Arg(0), options{
		valueFiles: valueFiles, apiVersions: apiVersions, release: *name, namespace: *namespace,
		kubeVersion: *kubeVersion, includeCRDs: *includeCRDs, notes: *notes,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "chart-render: error:", err)
		os.Exit(1)
	}
	os.Stdout.WriteString(out)
}

type options struct {
	valueFiles, apiVersions []string
	release, namespace      string
	kubeVersion             string
	includeCRDs, notes      bool
}

func readYAMLMap(file string) (map[string]interface{}, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	m := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if m == nil {
		m = map[string]interface{}{}
	}
	return m, nil
}

// coalesce merges src into dst: maps key by key, anything else replaced; null deletes.
func coalesce(dst, src map[string]interface{}) {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		sm, sok := v.(map[string]interface{})
		dm, dok := dst[k].(map[string]interface{})
		if sok && dok {
			coalesce(dm, sm)
			continue
		}
		dst[k] = v
	}
}

func render(chartDir string, o options) (string, error) {
	var meta Metadata
	raw, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return "", err
	}
	if err := yaml.Unmarshal(raw, &meta); err != nil {
		return "", fmt.Errorf("Chart.yaml: %w", err)
	}
	if meta.APIVersion != "v2" || meta.Name == "" || meta.Version == "" {
		return "", errors.New("Chart.yaml needs apiVersion v2, name and version")
	}
	if len(meta.Dependencies) > 0 {
		return "", errors.New("chart dependencies are not supported by this renderer")
	}

	values := map[string]interface{}{}
	if _, err := os.Stat(filepath.Join(chartDir, "values.yaml")); err == nil {
		if values, err = readYAMLMap(filepath.Join(chartDir, "values.yaml")); err != nil {
			return "", err
		}
	}
	for _, f := range o.valueFiles {
		m, err := readYAMLMap(f)
		if err != nil {
			return "", err
		}
		coalesce(values, m)
	}

	kv := strings.TrimPrefix(o.kubeVersion, "v")
	parts := strings.SplitN(kv, ".", 3)
	if len(parts) < 2 {
		return "", fmt.Errorf("--kube-version %q is not vMAJOR.MINOR[.PATCH]", o.kubeVersion)
	}
	caps := Capabilities{
		KubeVersion: KubeVersion{Version: "v" + kv, Major: parts[0], Minor: parts[1], GitVersion: "v" + kv},
		APIVersions: append(append(VersionSet{}, builtinAPIVersions...), o.apiVersions...),
		HelmVersion: map[string]string{"Version": "v3-compatible (chart-render)"},
	}

	files := Files{}
	templates := map[string]string{} // "<chart>/templates/<rel>" -> text
	err = filepath.Walk(chartDir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chartDir, p)
		rel = filepath.ToSlash(rel)
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if strings.HasPrefix(rel, "templates/") {
			templates[meta.Name+"/"+rel] = string(data)
		} else {
			files[rel] = data
		}
		return nil
	})
	if err != nil {
		return "", err
	}

	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": o.release, "Namespace": o.namespace, "IsInstall": true, "IsUpgrade": false,
			"Revision": 1, "Service": "Helm",
		},
		"Chart":        meta,
		"Capabilities": caps,
		"Files":        files,
	}

	t := template.New("gotpl").Option("missingkey=zero")
	t.Funcs(funcMap(t))
	names := make([]string, 0, len(templates))
	for n := range templates {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if _, err := t.New(n).Parse(templates[n]); err != nil {
			return "", err
		}
	}

	var out strings.Builder
	if o.notes {
		for _, n := range names {
			if strings.HasSuffix(n, "/NOTES.txt") {
				s, err := execute(t, n, top)
				if err != nil {
					return "", err
				}
				out.WriteString(s)
			}
		}
		return out.String(), nil
	}
	if o.includeCRDs {
		var crds []string
		for f := range files {
			if strings.HasPrefix(f, "crds/") && (strings.HasSuffix(f, ".yaml") || strings.HasSuffix(f, ".yml") || strings.HasSuffix(f, ".json")) {
				crds = append(crds, f)
			}
		}
		sort.Strings(crds)
		for _, f := range crds {
			fmt.Fprintf(&out, "---\n# Source: %s/%s\n%s\n", meta.Name, f, strings.TrimRight(string(files[f]), "\n"))
		}
	}
	for _, n := range names {
		base := path.Base(n)
		if strings.HasPrefix(base, "_") || !(strings.HasSuffix(base, ".yaml") || strings.HasSuffix(base, ".yml")) {
			continue
		}
		s, err := execute(t, n, top)
		if err != nil {
			return "", err
		}
		for i, doc := range splitDocs(s) {
			if err := checkDoc(doc); err != nil {
				return "", fmt.Errorf("%s: document %d: %w\n%s", n, i+1, err, doc)
			}
			fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", n, strings.TrimRight(doc, "\n"))
		}
	}
	return out.String(), nil
}

// execute runs one template with .Template set for it; "<no value>" is dropped as Helm does.
func execute(t *template.Template, name string, top map[string]interface{}) (string, error) {
	vals := map[string]interface{}{}
	for k, v := range top {
		vals[k] = v
	}
	vals["Template"] = map[string]interface{}{"Name": name, "BasePath": path.Dir(name)}
	var buf bytes.Buffer
	if err := t.ExecuteTemplate(&buf, name, vals); err != nil {
		return "", err
	}
	return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
}

// splitDocs cuts a rendered file at its "---" lines and drops empty documents.
func splitDocs(s string) []string {
	var docs []string
	var cur []string
	flush := func() {
		d := strings.Join(cur, "\n")
		if strings.TrimSpace(stripComments(d)) != "" {
			docs = append(docs, d)
		}
		cur = nil
	}
	for _, line := range strings.Split(s, "\n") {
		if strings.TrimRight(line, " \t") == "---" {
			flush()
			continue
		}
		cur = append(cur, line)
	}
	flush()
	return docs
}

func stripComments(d string) string {
	var keep []string
	for _, l := range strings.Split(d, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func checkDoc(doc string) error {
	var obj map[string]interface{}
	if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
		return fmt.Errorf("not valid YAML: %w", err)
	}
	if s, _ := obj["apiVersion"].(string); s == "" {
		return errors.New("no apiVersion")
	}
	if s, _ := obj["kind"].(string); s == "" {
		return errors.New("no kind")
	}
	return nil
}

const maxIncludeDepth = 1000

func funcMap(t *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	// Helm leaves these out: a chart must render the same on every machine.
	delete(f, "env")
	delete(f, "expandenv")

	depth := map[string]int{}
	f["include"] = func(name string, data interface{}) (string, error) {
		if depth[name] > maxIncludeDepth {
			return "", fmt.Errorf("include %q: nested more than %d deep", name, maxIncludeDepth)
		}
		depth[name]++
		defer func() { depth[name]-- }()
		var buf bytes.Buffer
		if err := t.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	f["tpl"] = func(text string, data interface{}) (string, error) {
		c, err := t.Clone()
		if err != nil {
			return "", err
		}
		if _, err := c.New("tpl").Parse(text); err != nil {
			return "", fmt.Errorf("tpl: %w", err)
		}
		var buf bytes.Buffer
		if err := c.ExecuteTemplate(&buf, "tpl", data); err != nil {
			return "", fmt.Errorf("tpl: %w", err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	f["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return nil, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return nil, errors.New(msg)
		}
		return v, nil
	}
	f["fail"] = func(msg string) (string, error) { return "", errors.New(msg) }
	f["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	f["toYaml"] = func(v interface{}) string {
		b, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(b), "\n")
	}
	f["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["fromYamlArray"] = func(s string) []interface{} {
		var a []interface{}
		if err := yaml.Unmarshal([]byte(s), &a); err != nil {
			a = []interface{}{err.Error()}
		}
		return a
	}
	f["toJson"] = func(v interface{}) string {
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(b)
	}
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["fromJsonArray"] = func(s string) []interface{} {
		var a []interface{}
		if err := json.Unmarshal([]byte(s), &a); err != nil {
			a = []interface{}{err.Error()}
		}
		return a
	}
	return f
}
