{{/*
Names and labels shared by every template, in the shape `helm create` uses so the
chart reads like any other.
*/}}

{{- define "kommune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name when it already contains the chart name (release
"kommune" gives "kommune"), otherwise "<release>-kommune".
*/}}
{{- define "kommune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kommune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kommune.labels" -}}
helm.sh/chart: {{ include "kommune.chart" . }}
{{ include "kommune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kommune
{{- end }}

{{/* Selector labels never change across upgrades: a StatefulSet selector is immutable. */}}
{{- define "kommune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kommune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kommune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kommune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kommune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Refuse value combinations that would install but not work, with a message that
says what to change. Included once, from the StatefulSet.
*/}}
{{- define "kommune.validateValues" -}}
{{- $backend := .Values.store.backend }}
{{- if not (has $backend (list "embedded" "postgres")) }}
{{- fail (printf "store.backend must be \"embedded\" or \"postgres\", got %q" $backend) }}
{{- end }}
{{- if and (eq $backend "postgres") (not .Values.store.postgres.existingSecret) }}
{{- fail "store.backend=postgres needs store.postgres.existingSecret: a Secret holding the connection URL" }}
{{- end }}
{{- if gt (int .Values.replicas) 1 }}
{{- if eq $backend "embedded" }}
{{- fail "replicas > 1 needs store.backend=postgres: the embedded store lives on one replica's volume" }}
{{- end }}
{{- if not .Values.leaderElection.enabled }}
{{- fail "replicas > 1 needs leaderElection.enabled=true, or two operators would schedule the same tasks" }}
{{- end }}
{{- if not .Values.ledger.keySecret }}
{{- fail "replicas > 1 needs ledger.keySecret: every replica signs the one ledger, so they share one key (a key on each replica's volume would be refused by the ledger at takeover)" }}
{{- end }}
{{- end }}
{{- if not (has .Values.gateway.service.type (list "NodePort" "LoadBalancer" "ClusterIP")) }}
{{- fail (printf "gateway.service.type must be NodePort, LoadBalancer or ClusterIP, got %q" .Values.gateway.service.type) }}
{{- end }}
{{- end }}
