{{- define "credbroker.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "credbroker.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "credbroker.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: brokerd
{{- end -}}

{{- define "credbroker.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* brokerd's configuration: config, with what the chart owns set. */}}
{{- define "credbroker.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $_ := set $cfg "listen" (printf "0.0.0.0:%d" (int .Values.service.port)) -}}
{{- if .Values.store.etcd -}}
{{- $etcd := deepCopy .Values.store.etcd -}}
{{- with .Values.store.etcdSecret -}}
{{- if .secretName -}}
{{- if .tls -}}
{{- $_ := set $etcd "tls" (dict "ca_file" "/etc/credbroker/etcd/ca.crt" "cert_file" "/etc/credbroker/etcd/tls.crt" "key_file" "/etc/credbroker/etcd/tls.key") -}}
{{- end -}}
{{- if .username -}}
{{- $_ := set $etcd "username" .username -}}
{{- $_ := set $etcd "password_file" "/etc/credbroker/etcd/password" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "store" (dict "etcd" $etcd) -}}
{{- else -}}
{{- $_ := set $cfg "store" (dict "path" "/var/lib/credbroker/leases.db") -}}
{{- end -}}
{{- $tls := dict "cert_file" "/etc/credbroker/tls/tls.crt" "key_file" "/etc/credbroker/tls/tls.key" -}}
{{- if .Values.tls.clientCA -}}
{{- $_ := set $tls "client_ca_file" "/etc/credbroker/tls/ca.crt" -}}
{{- end -}}
{{- $_ := set $cfg "tls" $tls -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $cfg "metrics" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port))) -}}
{{- end -}}
{{- $targets := list -}}
{{- range $cfg.targets -}}
{{- $targets = append $targets (merge (dict "password_file" (printf "/etc/credbroker/passwords/%s" .name)) .) -}}
{{- end -}}
{{- $_ := set $cfg "targets" $targets -}}
{{- if not $cfg.tokens }}{{ $_ := unset $cfg "tokens" }}{{ end -}}
{{- if not $cfg.admins }}{{ $_ := unset $cfg "admins" }}{{ end -}}
{{- toYaml $cfg -}}
{{- end -}}
