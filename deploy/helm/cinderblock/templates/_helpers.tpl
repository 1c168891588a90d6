{{/*
Names, labels and the TOML writer shared by the templates.
*/}}

{{/* The CSI driver name: fixed, the binary reports it in GetPluginInfo. */}}
{{- define "cinderblock.driverName" -}}csi.cinderblock.dev{{- end }}

{{- define "cinderblock.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/* Name of a role's object: <fullname>-<role>. Call with (list $ "role"). */}}
{{- define "cinderblock.roleName" -}}
{{- $top := index . 0 -}}
{{- printf "%s-%s" (include "cinderblock.fullname" $top) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "cinderblock.serviceAccount" -}}
{{- $top := index . 0 -}}{{- $role := index . 1 -}}
{{- default (include "cinderblock.roleName" .) (index $top.Values.serviceAccount $role) -}}
{{- end }}

{{- define "cinderblock.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Selector labels of a role. Call with (list $ "role"). */}}
{{- define "cinderblock.selectorLabels" -}}
{{- $top := index . 0 -}}
app.kubernetes.io/name: {{ $top.Chart.Name }}
app.kubernetes.io/instance: {{ $top.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "cinderblock.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end }}

{{/* Pod annotations: scraping of the role's metrics port. Call with (list $ port). */}}
{{- define "cinderblock.podAnnotations" -}}
{{- $top := index . 0 -}}
{{- if $top.Values.metrics.annotate }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with $top.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "cinderblock.chapSecretName" -}}
{{- default (include "cinderblock.roleName" (list . "chap")) .Values.chap.existingSecret -}}
{{- end }}

{{- define "cinderblock.tlsSecretName" -}}
{{- default (include "cinderblock.roleName" (list . "agent-tls")) .Values.agentTls.existingSecret -}}
{{- end }}

{{/*
TOML, written from values. Helm decodes YAML numbers as float64: a whole number is written
as a TOML integer (the config's u64/u32 keys reject floats; its f64 keys accept integers),
any other as a float. Strings are JSON-quoted: every JSON escape is a valid TOML escape.
*/}}
{{- define "cinderblock.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end }}

{{- define "cinderblock.tomlValue" -}}
{{- if kindIs "string" . -}}
{{ toJson . }}
{{- else if kindIs "bool" . -}}
{{ ternary "true" "false" . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) -}}
{{- if eq (float64 (int64 .)) (float64 .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "int32" .) -}}
{{ . }}
{{- else if kindIs "slice" . -}}
[{{- range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "cinderblock.tomlValue" $v }}{{ end -}}]
{{- else if kindIs "map" . -}}
{ {{- $first := true -}}
{{- range $k, $v := . }}{{ if not (kindIs "invalid" $v) }}{{ if not $first }},{{ end }}{{ $first = false }} {{ include "cinderblock.tomlKey" $k }} = {{ include "cinderblock.tomlValue" $v }}{{ end }}{{ end }} }
{{- else -}}
{{ fail (printf "cannot write %v (%s) as TOML" . (kindOf .)) }}
{{- end -}}
{{- end }}

{{/* Every key of a map as `key = value` lines, in key order; nulls are left out. */}}
{{- define "cinderblock.tomlPairs" -}}
{{- range $k, $v := . }}
{{- if not (kindIs "invalid" $v) }}
{{ include "cinderblock.tomlKey" $k }} = {{ include "cinderblock.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
