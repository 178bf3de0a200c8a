{{/* vim: set filetype=mustache: */}}

{{/* Chart name, truncated to 63 chars (DNS label). */}}
{{- define "lenpred.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name, the prefix of every resource. Truncated so that the longest suffix
("-engine-NN" pod names inside a 63-char DNS label) still fits.
*/}}
{{- define "lenpred.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lenpred.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "router") */}}
{{- define "lenpred.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lenpred.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Full label set of one component: (dict "ctx" $ "component" "router") */}}
{{- define "lenpred.labels" -}}
helm.sh/chart: {{ include "lenpred.chart" .ctx }}
{{ include "lenpred.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: lenpred
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Resource names. */}}
{{- define "lenpred.engine.fullname" -}}{{ include "lenpred.fullname" . }}-engine{{- end -}}
{{- define "lenpred.sidecar.fullname" -}}{{ include "lenpred.fullname" . }}-sidecar{{- end -}}
{{- define "lenpred.router.fullname" -}}{{ include "lenpred.fullname" . }}-router{{- end -}}
{{- define "lenpred.redis.fullname" -}}{{ include "lenpred.fullname" . }}-redis{{- end -}}
{{- define "lenpred.policy.fullname" -}}{{ include "lenpred.fullname" . }}-policy{{- end -}}

{{/* Service account name of one component: (dict "ctx" $ "component" "router") */}}
{{- define "lenpred.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount -}}
{{- if $sa.create -}}
{{- default (printf "%s-%s" (include "lenpred.fullname" .ctx) .component) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{/* Image reference: (dict "ctx" $ "image" .Values.router.image) ; tag defaults to appVersion. */}}
{{- define "lenpred.image" -}}
{{- printf "%s:%s" .image.repository (toString (default .ctx.Chart.AppVersion .image.tag)) -}}
{{- end -}}

{{- define "lenpred.keyNamespace" -}}
{{- default .Release.Name .Values.keyNamespace -}}
{{- end -}}

{{/* Cluster-internal DNS suffix of a Service in the release namespace. */}}
{{- define "lenpred.svcSuffix" -}}{{ .Release.Namespace }}.svc{{- end -}}

{{/* host:port of the sidecar gRPC Service, as the tap's LENPRED_SIDECAR. */}}
{{- define "lenpred.sidecar.address" -}}
{{- if .Values.engine.tap.sidecarAddress -}}
{{- .Values.engine.tap.sidecarAddress -}}
{{- else -}}
{{- printf "%s.%s:%d" (include "lenpred.sidecar.fullname" .) (include "lenpred.svcSuffix" .) (int .Values.sidecar.grpcPort) -}}
{{- end -}}
{{- end -}}

{{/* Model id the tap reports (LENPRED_MODEL_ID). */}}
{{- define "lenpred.modelId" -}}
{{- .Values.engine.model.id | default .Values.engine.model.servedName | default .Values.engine.model.path -}}
{{- end -}}

{{/* Model name clients send in the "model" field. */}}
{{- define "lenpred.servedModelName" -}}
{{- .Values.engine.model.servedName | default .Values.engine.model.path -}}
{{- end -}}

{{/* Comma-separated router backends: this release's engine pods, then router.backends. */}}
{{- define "lenpred.router.backends" -}}
{{- $backends := list -}}
{{- if .Values.engine.enabled -}}
{{- $engine := include "lenpred.engine.fullname" . -}}
{{- range $i := until (int .Values.engine.replicas) -}}
{{- $backends = append $backends (printf "http://%s-%d.%s.%s:%d" $engine $i $engine (include "lenpred.svcSuffix" $) (int $.Values.engine.port)) -}}
{{- end -}}
{{- end -}}
{{- $backends = concat $backends .Values.router.backends -}}
{{- join "," $backends -}}
{{- end -}}

{{/* Redis: bundled unless an external URL or Secret is given. */}}
{{- define "lenpred.redis.bundled" -}}
{{- if and (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) -}}true{{- end -}}
{{- end -}}

{{- define "lenpred.redis.url" -}}
{{- printf "redis://%s.%s:%d/0" (include "lenpred.redis.fullname" .) (include "lenpred.svcSuffix" .) (int .Values.redis.port) -}}
{{- end -}}

{{/* Redis AUTH: a password Secret is used (bundled Redis with auth on, or a Secret you name). */}}
{{- define "lenpred.redis.auth" -}}
{{- if or .Values.redis.auth.existingSecret (and (include "lenpred.redis.bundled" .) .Values.redis.auth.enabled) -}}true{{- end -}}
{{- end -}}

{{/* The chart generates the Redis password Secret (bundled Redis, auth on, no Secret of yours). */}}
{{- define "lenpred.redis.generatePassword" -}}
{{- if and (include "lenpred.redis.bundled" .) .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* secretKeyRef body of the Redis password. */}}
{{- define "lenpred.redis.passwordRef" -}}
secretKeyRef:
  name: {{ .Values.redis.auth.existingSecret | default (printf "%s-redis-auth" (include "lenpred.fullname" .)) }}
  key: {{ ternary .Values.redis.auth.existingSecretKey "password" (ne .Values.redis.auth.existingSecret "") }}
{{- end -}}

{{/* The LENPRED_REDIS_URL (+ LENPRED_REDIS_PASSWORD) env entries for router and sidecar. */}}
{{- define "lenpred.redis.env" -}}
- name: LENPRED_REDIS_URL
{{- if include "lenpred.redis.bundled" . }}
  value: {{ include "lenpred.redis.url" . | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret | default (printf "%s-redis-url" (include "lenpred.fullname" .)) }}
      key: {{ if .Values.redis.external.existingSecret }}{{ .Values.redis.external.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}
{{- if include "lenpred.redis.auth" . }}
- name: LENPRED_REDIS_PASSWORD
  valueFrom:
    {{- include "lenpred.redis.passwordRef" . | nindent 4 }}
{{- end }}
{{- end -}}

{{/*
A generated secret value that survives upgrades: the value the Secret already holds in the cluster
(helm install/upgrade look it up), else a new random one (first install; `helm template` and
--dry-run cannot look up, so they show a fresh value each time).
(dict "ctx" $ "name" "<secret>" "key" "<data key>" "length" 40)
*/}}
{{- define "lenpred.keptRandom" -}}
{{- $old := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- $data := (get (default dict $old) "data") | default dict -}}
{{- if hasKey $data .key -}}
{{- index $data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (int .length) -}}
{{- end -}}
{{- end -}}

{{/* Router API keys: the Secret holding keys.yaml (yours, or the one the chart generates). */}}
{{- define "lenpred.router.apiKeysSecret" -}}
{{- .Values.router.auth.existingSecret | default (printf "%s-api-keys" (include "lenpred.router.fullname" .)) -}}
{{- end -}}

{{/* Where the tap -> sidecar TLS material is mounted (sidecar and engine pods). */}}
{{- define "lenpred.tlsDir" -}}/etc/lenpred/tls{{- end -}}

{{/*
Pod annotations: Prometheus scrape annotations (metrics.podAnnotations), checksums (a pod rolls
when one changes; empty ones are left out), then the component's podAnnotations.
(dict "ctx" $ "port" 9091 "extra" .Values.x.podAnnotations "checksums" (dict "policy" "..."))
Renders "annotations: ..." or nothing.
*/}}
{{- define "lenpred.podAnnotations" -}}
{{- $ann := dict -}}
{{- if .ctx.Values.metrics.podAnnotations -}}
{{- $_ := set $ann "prometheus.io/scrape" "true" -}}
{{- $_ := set $ann "prometheus.io/port" (toString .port) -}}
{{- $_ := set $ann "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- range $k, $v := (default dict .checksums) -}}
{{- if $v -}}
{{- $_ := set $ann (printf "checksum/%s" $k) $v -}}
{{- end -}}
{{- end -}}
{{- range $k, $v := .extra -}}
{{- $_ := set $ann $k (toString $v) -}}
{{- end -}}
{{- if $ann -}}
annotations:
{{ toYaml $ann | indent 2 }}
{{- end -}}
{{- end -}}

{{/* Thread-count env for torch/OpenMP processes. */}}
{{- define "lenpred.threadsEnv" -}}
- name: OMP_NUM_THREADS
  value: {{ . | quote }}
- name: MKL_NUM_THREADS
  value: {{ . | quote }}
{{- end -}}

{{/* PodDisruptionBudget spec body: (dict "pdb" .Values.router.pdb) */}}
{{- define "lenpred.pdbSpec" -}}
{{- if and (not (kindIs "invalid" .pdb.minAvailable)) (not (kindIs "invalid" .pdb.maxUnavailable)) -}}
{{- fail "pdb: set only one of minAvailable and maxUnavailable (set the other to null)" -}}
{{- end -}}
{{- if not (kindIs "invalid" .pdb.minAvailable) }}
minAvailable: {{ .pdb.minAvailable }}
{{- else if not (kindIs "invalid" .pdb.maxUnavailable) }}
maxUnavailable: {{ .pdb.maxUnavailable }}
{{- else }}
maxUnavailable: 1
{{- end }}
{{- end -}}

{{/*
Cross-field checks that JSON Schema cannot express well; they fail rendering with a clear message.
*/}}
{{- define "lenpred.validate" -}}
{{- if and .Values.redis.external.url .Values.redis.external.existingSecret -}}
{{- fail "redis.external: set either url or existingSecret, not both" -}}
{{- end -}}
{{- if and (eq .Values.sidecar.device "cuda") (not .Values.sidecar.gpu.enabled) -}}
{{- fail "sidecar.device=cuda needs sidecar.gpu.enabled=true (or use device auto/cpu)" -}}
{{- end -}}
{{- if and (not .Values.engine.enabled) (not .Values.router.backends) -}}
{{- fail "engine.enabled=false: list your engines in router.backends" -}}
{{- end -}}
{{- end -}}
