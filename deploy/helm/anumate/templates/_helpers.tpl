{{/* The chart's name. */}}
{{- define "anumate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name for every object. */}}
{{- define "anumate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "anumate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "anumate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: anumate
{{- end -}}

{{/* Selector labels of the chart's pods (all roles). */}}
{{- define "anumate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "anumate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A role's object name: (list $ "registry"). */}}
{{- define "anumate.component" -}}
{{- $top := index . 0 -}}
{{- printf "%s-%s" (include "anumate.fullname" $top) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A role's gRPC URL inside the cluster: (list $ "registry"). */}}
{{- define "anumate.url" -}}
{{- $top := index . 0 -}}
{{- printf "%s://%s:%d" (ternary "https" "http" $top.Values.tls.enabled) (include "anumate.component" .) (int $top.Values.ports.grpc) -}}
{{- end -}}

{{/* The image reference. */}}
{{- define "anumate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The ServiceAccount name. */}}
{{- define "anumate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "anumate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The full gRPC service name each role serves (its health check name). */}}
{{- define "anumate.grpcService" -}}
{{- $names := dict
  "registry" "anumate.registry.v1.RegistryService"
  "receipts" "anumate.receipts.v1.ReceiptsService"
  "policy" "anumate.policy.v1.PolicyService"
  "captokens" "anumate.captokens.v1.CapTokensService"
  "compiler" "anumate.compiler.v1.CompilerService"
  "events" "anumate.events.v1.EventsService"
  "approvals" "anumate.approvals.v1.ApprovalsService"
  "ghostrun" "anumate.ghostrun.v1.GhostRunService"
  "connectors" "anumate.connectors.v1.ConnectorHubService"
  "orchestrator" "anumate.orchestrator.v1.OrchestratorService" -}}
{{- required (printf "unknown service role %q (services.*)" .) (get $names .) -}}
{{- end -}}

{{/* A role's settings: `defaults` overridden by services.<role>. (list $ "registry") */}}
{{- define "anumate.roleValues" -}}
{{- $top := index . 0 -}}
{{- $own := get $top.Values.services (index . 1) | default dict -}}
{{- toYaml (mergeOverwrite (deepCopy $top.Values.defaults) (deepCopy $own)) -}}
{{- end -}}

{{/* Pod annotations and labels for the mesh sidecars. */}}
{{- define "anumate.meshAnnotations" -}}
{{- if .Values.mesh.linkerd.inject -}}
linkerd.io/inject: enabled
{{- end -}}
{{- end -}}
{{- define "anumate.meshLabels" -}}
{{- if .Values.mesh.istio.inject -}}
sidecar.istio.io/inject: "true"
{{- end -}}
{{- end -}}

{{/*
TOML from a values map. Helm reads every number as a float (toToml would
write 30 as 30.0, which integer settings refuse), so whole numbers are
written as integers here. Scalars and arrays of scalars first, then
sub-tables ([a.b]) and arrays of tables ([[a.b]]); maps inside arrays are
inline tables.
*/}}
{{- define "anumate.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end -}}
{{- end -}}

{{- define "anumate.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}{{ toJson $v }}
{{- else if kindIs "bool" $v -}}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) -}}
{{- if eq (float64 $v) (floor $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end -}}
{{- else if kindIs "slice" $v -}}
[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "anumate.tomlValue" $e }}{{ end }}]
{{- else if kindIs "map" $v -}}
{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }}, {{ end }}{{ include "anumate.tomlKey" $k }} = {{ include "anumate.tomlValue" (index $v $k) }}{{ end -}} }
{{- else -}}
{{- fail (printf "configuration: cannot write %v (%s) as TOML" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{- define "anumate.tomlTable" -}}
{{- $path := .path -}}
{{- $t := .table -}}
{{- range $k := keys $t | sortAlpha }}
{{- $v := index $t $k }}
{{- $tables := or (kindIs "map" $v) (and (kindIs "slice" $v) $v (kindIs "map" (first $v))) }}
{{- if and (not $tables) (not (kindIs "invalid" $v)) }}
{{ include "anumate.tomlKey" $k }} = {{ include "anumate.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $t | sortAlpha }}
{{- $v := index $t $k }}
{{- $p := include "anumate.tomlKey" $k }}
{{- if $path }}{{ $p = printf "%s.%s" $path $p }}{{ end }}
{{- if kindIs "map" $v }}

[{{ $p }}]
{{- include "anumate.tomlTable" (dict "path" $p "table" $v) }}
{{- else if and (kindIs "slice" $v) $v (kindIs "map" (first $v)) }}
{{- range $e := $v }}

[[{{ $p }}]]
{{- include "anumate.tomlTable" (dict "path" $p "table" $e) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The configuration file: values.config with the ports, templates expanded. */}}
{{- define "anumate.config" -}}
{{- $config := tpl (toYaml .Values.config) . | fromYaml -}}
{{- $grpc := get $config "grpc" | default dict -}}
{{- $_ := set $grpc "listen" (printf "0.0.0.0:%d" (int .Values.ports.grpc)) -}}
{{- $_ := set $config "grpc" $grpc -}}
{{- $admin := get $config "admin" | default dict -}}
{{- $_ := set $admin "listen" (printf "0.0.0.0:%d" (int .Values.ports.metrics)) -}}
{{- $_ := set $config "admin" $admin -}}
{{- $gateway := get $config "gateway" | default dict -}}
{{- $_ := set $gateway "listen" (printf "0.0.0.0:%d" (int .Values.ports.http)) -}}
{{- $upstream := .Values.gateway.upstream | default (printf "http://%s:%d" (include "anumate.component" (list . "router")) (int .Values.ports.grpc)) -}}
{{- $_ := set $gateway "upstream" $upstream -}}
{{- $_ := set $config "gateway" $gateway -}}
{{- if .Values.tls.enabled -}}
{{- if and .Values.gateway.enabled (not .Values.gateway.upstream) -}}
{{- fail "tls.enabled: the chart's router speaks plaintext; set gateway.upstream (a router that speaks mTLS) or gateway.enabled=false" -}}
{{- end -}}
{{- $tls := get $config "tls" | default dict -}}
{{- $_ := set $tls "cert" "/etc/anumate/tls/tls.crt" -}}
{{- $_ := set $tls "key" "/etc/anumate/tls/tls.key" -}}
{{- $_ := set $tls "client_ca" "/etc/anumate/tls/ca.crt" -}}
{{- $_ := set $tls "ca" "/etc/anumate/tls/ca.crt" -}}
{{- $_ := set $tls "trust_domain" .Values.tls.trustDomain -}}
{{- $_ := set $tls "reload_secs" .Values.tls.reloadSecs -}}
{{- $_ := set $config "tls" $tls -}}
{{- end -}}
# anumate.toml, rendered by the anumate Helm chart from its values.
{{ include "anumate.tomlTable" (dict "path" "" "table" $config) }}
{{- end -}}
