{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: the release name when it already contains the chart name,
else <release>-<chart>. Kept to 54 characters so that "-operator" still fits a label.
*/}}
{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the operator's objects. */}}
{{- define "kiln.operator.fullname" -}}
{{- printf "%s-operator" (include "kiln.fullname" .) }}
{{- end }}

{{- define "kiln.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kiln.labels" -}}
helm.sh/chart: {{ include "kiln.chart" . }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kiln
{{- end }}

{{/*
Selector of the operator's pods. The component label keeps it off the driver and
executor pods of jobs, which carry app.kubernetes.io/name: kiln too.
*/}}
{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository[:tag][@digest] of an image block, the tag defaulting to `tag`. */}}
{{- define "kiln.imageRef" -}}
{{- $ref := .image.repository }}
{{- $tag := default .tag .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" $ref .image.digest }}
{{- else }}
{{- printf "%s:%s" $ref $tag }}
{{- end }}
{{- end }}

{{/* The operator's image. */}}
{{- define "kiln.image" -}}
{{- include "kiln.imageRef" (dict "image" .Values.image "tag" .Chart.AppVersion) }}
{{- end }}

{{/* The default image of job pods: jobImage, its empty fields taken from image. */}}
{{- define "kiln.jobImage" -}}
{{- if .Values.jobImage.repository }}
{{- include "kiln.imageRef" (dict "image" .Values.jobImage "tag" (default .Chart.AppVersion .Values.image.tag)) }}
{{- else }}
{{- include "kiln.image" . }}
{{- end }}
{{- end }}

{{/* Watched namespaces, comma-separated (empty: all). */}}
{{- define "kiln.watchNamespaces" -}}
{{- join "," (uniq .Values.watchNamespaces) }}
{{- end }}

{{/*
The API access the operator needs, split by where it applies. Together these are exactly
the rules of operator/src/rbac.rs (tests/helm/check compares them).
On the namespaced objects of the namespaces it watches:
*/}}
{{- define "kiln.rbac.jobRules" -}}
# Watch jobs; delete those whose ttlSecondsAfterFinished ran out.
- apiGroups: ["kiln.dev"]
  resources: ["computejobs"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["kiln.dev"]
  resources: ["computejobs/status"]
  verbs: ["get", "patch", "update"]
# The job's children: watched, server-side applied, pods deleted on loss or suspend.
- apiGroups: [""]
  resources: ["pods", "services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The job's token Secret: made, then read by name; never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch", "delete"]
# The job's NetworkPolicy: server-side applied, garbage-collected with the job.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* On cluster-scoped objects: whether a pod's node is lost, its disruption taints, what nodes hold. */}}
{{- define "kiln.rbac.clusterRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* Leader election, in the release namespace: only the operator's own Lease. */}}
{{- define "kiln.rbac.leaseRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ .Values.operator.leaderElection.leaseName | quote }}]
  verbs: ["get", "update"]
{{- end }}
