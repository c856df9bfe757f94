{{/* The release's base name, at most 40 characters so KubeRay's derived names stay under 63. */}}
{{- define "lorafleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "lorafleet.coordinatorSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: coordinator
{{- end -}}

{{/* KubeRay names the head's Service <raycluster>-head-svc; 6379 is the GCS port. */}}
{{- define "lorafleet.rayHeadService" -}}
{{- printf "%s-head-svc" (include "lorafleet.fullname" .) -}}
{{- end -}}

{{- define "lorafleet.rayAddress" -}}
{{- printf "%s.%s.svc.cluster.local:6379" (include "lorafleet.rayHeadService" .) .Release.Namespace -}}
{{- end -}}

{{- define "lorafleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | toString) -}}
{{- end -}}

{{- define "lorafleet.claimName" -}}
{{- .Values.storage.existingClaim | default (printf "%s-models" (include "lorafleet.fullname" .)) -}}
{{- end -}}

{{/* Checks that stop a render with a clear message. */}}
{{- define "lorafleet.validate" -}}
{{- if lt (int .Values.tp) 1 -}}{{- fail "tp must be at least 1" -}}{{- end -}}
{{- if lt (int .Values.replicas) 1 -}}{{- fail "replicas must be at least 1" -}}{{- end -}}
{{- if not (has .Values.placementStrategy (list "PACK" "SPREAD" "STRICT_PACK" "STRICT_SPREAD")) -}}
{{- fail "placementStrategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD" -}}
{{- end -}}
{{- if not (regexMatch "^[0-9]+Gi$" (toString .Values.ray.worker.memoryPerRank)) -}}
{{- fail "ray.worker.memoryPerRank must be a whole number of Gi, e.g. 32Gi" -}}
{{- end -}}
{{- if not (has .Values.device (list "cuda" "cpu")) -}}{{- fail "device must be cuda or cpu" -}}{{- end -}}
{{- if not (has .Values.ray.authMode (list "disabled" "token")) -}}{{- fail "ray.authMode must be disabled or token" -}}{{- end -}}
{{- if and (eq .Values.ray.authMode "token") (not .Values.ray.authSecret) -}}
{{- fail "ray.authMode=token needs ray.authSecret: a Secret whose key auth_token holds the token" -}}
{{- end -}}
{{- end -}}

{{/* Env that every Ray process of the release shares. */}}
{{- define "lorafleet.rayEnv" -}}
- name: RAY_AUTH_MODE
  value: {{ .Values.ray.authMode | quote }}
{{- if eq .Values.ray.authMode "token" }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ray.authSecret }}
      key: auth_token
{{- end }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end -}}

{{- define "lorafleet.modelsVolume" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "lorafleet.claimName" . }}
    readOnly: true
{{- end -}}

{{- define "lorafleet.modelsMount" -}}
- name: models
  mountPath: {{ .Values.storage.mountPath }}
  readOnly: true
{{- end -}}

{{- define "lorafleet.podSecurity" -}}
runAsNonRoot: {{ .Values.securityContext.runAsNonRoot }}
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
{{- end -}}

{{- define "lorafleet.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}
