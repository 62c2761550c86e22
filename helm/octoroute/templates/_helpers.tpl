{{/* ---------------------------------------------------------------- names */}}
{{- define "octoroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "octoroute.fullname" -}}
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

{{- define "octoroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "octoroute.labels" -}}
helm.sh/chart: {{ include "octoroute.chart" . }}
app.kubernetes.io/name: {{ include "octoroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: octoroute
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "octoroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "octoroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Resource names of the components. */}}
{{- define "octoroute.gateway.fullname" -}}
{{- include "octoroute.fullname" . }}
{{- end }}

{{- define "octoroute.redis.fullname" -}}
{{- printf "%s-redis" (include "octoroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "octoroute.secretName" -}}
{{- default (include "octoroute.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "octoroute.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "octoroute.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "octoroute.gateway.image" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (default .Chart.AppVersion .Values.gateway.image.tag) }}
{{- end }}

{{/* In-cluster DNS name of a Service of this release. Args: (list $ "svc-name"). */}}
{{- define "octoroute.svcHost" -}}
{{- $root := index . 0 -}}
{{- printf "%s.%s.svc.%s" (index . 1) $root.Release.Namespace $root.Values.clusterDomain }}
{{- end }}

{{/* Env var names (never under OCTOROUTE_*__*, which the gateway treats as config overrides). */}}
{{- define "octoroute.upstreamKeyEnv" -}}
{{- printf "UPSTREAM_API_KEY_%s" (. | upper | replace "-" "_" | replace "." "_") }}
{{- end }}

{{/* ------------------------------------------------- vLLM servers to deploy
Returns YAML {servers: [...]}; each server is the merged vLLM settings plus
  key (name suffix), fullName (Deployment/Service name), servedNames, args.
*/}}
{{- define "octoroute.vllmServers" -}}
{{- $root := . -}}
{{- $d := .Values.experts.vllm -}}
{{- $servers := list -}}
{{- $entries := list -}}
{{- if eq .Values.experts.mode "vllm" -}}
{{- range .Values.experts.list }}
{{- $s := mergeOverwrite (deepCopy $d) (omit (deepCopy .) "labels" "gateway" "servedModelName") -}}
{{- $_ := set $s "key" .name -}}
{{- $_ := set $s "servedNames" (list (default .name .servedModelName)) -}}
{{- $_ := set $s "modelArg" .model -}}
{{- $_ := set $s "loraArgs" (list) -}}
{{- $entries = append $entries $s -}}
{{- end }}
{{- else if eq .Values.experts.mode "multiLora" -}}
{{- $m := .Values.experts.multiLora -}}
{{- $s := mergeOverwrite (deepCopy $d) (omit (deepCopy $m) "name" "baseModel" "baseExpert" "maxLoras" "maxLoraRank" "adapters") -}}
{{- $_ := set $s "key" $m.name -}}
{{- $_ := set $s "servedNames" (list (default $m.name $m.baseExpert)) -}}
{{- $_ := set $s "modelArg" $m.baseModel -}}
{{- $lora := list "--enable-lora" "--max-loras" (toString $m.maxLoras) "--max-lora-rank" (toString $m.maxLoraRank) "--lora-modules" -}}
{{- range $m.adapters }}
{{- $lora = append $lora (printf "%s=%s" .name .path) -}}
{{- end }}
{{- $_ := set $s "loraArgs" $lora -}}
{{- $entries = append $entries $s -}}
{{- end }}
{{- range $entries }}
{{- $s := . -}}
{{- $_ := set $s "fullName" (printf "%s-expert-%s" (include "octoroute.fullname" $root) $s.key | trunc 63 | trimSuffix "-") -}}
{{- $args := list $s.modelArg "--served-model-name" -}}
{{- $args = concat $args $s.servedNames -}}
{{- $args = concat $args (list "--host" "0.0.0.0" "--port" (toString $s.port)) -}}
{{- if $s.maxModelLen }}{{- $args = concat $args (list "--max-model-len" (toString (int64 $s.maxModelLen))) -}}{{- end }}
{{- if $s.gpuMemoryUtilization }}{{- $args = concat $args (list "--gpu-memory-utilization" (toString $s.gpuMemoryUtilization)) -}}{{- end }}
{{- if $s.dtype }}{{- $args = concat $args (list "--dtype" $s.dtype) -}}{{- end }}
{{- if gt (int $s.gpus) 1 }}{{- $args = concat $args (list "--tensor-parallel-size" (toString (int $s.gpus))) -}}{{- end }}
{{- $args = concat $args $s.loraArgs $s.extraArgs -}}
{{- $_ := set $s "args" $args -}}
{{- $servers = append $servers $s -}}
{{- end }}
{{- dict "servers" $servers | toYaml }}
{{- end }}

{{/* ------------------------------------------- experts in the gateway config */}}
{{- define "octoroute.gatewayExperts" -}}
{{- $root := . -}}
{{- $experts := list -}}
{{- $mode := .Values.experts.mode -}}
{{- $servers := (include "octoroute.vllmServers" . | fromYaml).servers -}}
{{- $keyEnv := "" -}}
{{- if .Values.experts.vllm.requireApiKey }}{{- $keyEnv = "VLLM_API_KEY" -}}{{- end }}
{{- if eq $mode "vllm" -}}
{{- range $i, $e := .Values.experts.list }}
{{- $s := index $servers $i -}}
{{- $x := dict "name" $e.name "backend" "vllm" "model" (first $s.servedNames) -}}
{{- $_ := set $x "base_url" (printf "http://%s:%v/v1" (include "octoroute.svcHost" (list $root $s.fullName)) $s.port) -}}
{{- if $keyEnv }}{{- $_ := set $x "api_key_env" $keyEnv -}}{{- end }}
{{- with $e.labels }}{{- $_ := set $x "labels" . -}}{{- end }}
{{- $experts = append $experts (mergeOverwrite (deepCopy (default (dict) $e.gateway)) $x) -}}
{{- end }}
{{- else if eq $mode "multiLora" -}}
{{- $m := .Values.experts.multiLora -}}
{{- $s := first $servers -}}
{{- $url := printf "http://%s:%v/v1" (include "octoroute.svcHost" (list $root $s.fullName)) $s.port -}}
{{- if $m.baseExpert }}
{{- $x := dict "name" $m.baseExpert "backend" "vllm" "model" $m.baseExpert "base_url" $url -}}
{{- if $keyEnv }}{{- $_ := set $x "api_key_env" $keyEnv -}}{{- end }}
{{- $experts = append $experts $x -}}
{{- end }}
{{- range $m.adapters }}
{{- $x := dict "name" .name "backend" "vllm" "model" .name "base_url" $url -}}
{{- if $keyEnv }}{{- $_ := set $x "api_key_env" $keyEnv -}}{{- end }}
{{- with .labels }}{{- $_ := set $x "labels" . -}}{{- end }}
{{- $experts = append $experts (mergeOverwrite (deepCopy (default (dict) .gateway)) $x) -}}
{{- end }}
{{- else if eq $mode "external" -}}
{{- range .Values.experts.external }}
{{- $x := dict "name" .name "backend" "vllm" "base_url" .baseUrl -}}
{{- with .model }}{{- $_ := set $x "model" . -}}{{- end }}
{{- if or .apiKey (hasKey $root.Values.secrets.upstreamApiKeys .name) }}
{{- $_ := set $x "api_key_env" (include "octoroute.upstreamKeyEnv" .name) -}}
{{- end }}
{{- with .labels }}{{- $_ := set $x "labels" . -}}{{- end }}
{{- $experts = append $experts (mergeOverwrite (deepCopy (default (dict) .gateway)) $x) -}}
{{- end }}
{{- end }}
{{- if not $experts }}
{{- fail (printf "experts.mode is %q but it defines no experts: fill experts.list, experts.multiLora.adapters/baseExpert or experts.external" $mode) }}
{{- end }}
{{- $seen := list -}}
{{- range $experts }}
{{- if has .name (list "auto" "fusion") }}
{{- fail (printf "expert name %q is reserved (the gateway uses the model names auto and fusion); rename that expert" .name) }}
{{- end }}
{{- if has .name $seen }}
{{- fail (printf "expert names must be unique; %q appears twice in experts (%s mode)" .name $mode) }}
{{- end }}
{{- $seen = append $seen .name -}}
{{- end }}
{{- dict "experts" $experts | toYaml }}
{{- end }}

{{/* ------------------------------------------------------------ Redis / cache */}}
{{- define "octoroute.redisUrl" -}}
{{- if eq .Values.redis.mode "internal" -}}
{{- printf "redis://%s:6379/0" (include "octoroute.svcHost" (list . (include "octoroute.redis.fullname" .))) }}
{{- else if eq .Values.redis.mode "external" -}}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* --------------------------------------------------------- gateway config */}}
{{- define "octoroute.gatewayConfig" -}}
{{- $c := .Values.gateway.config -}}
{{- $cfg := dict -}}
{{- $_ := set $cfg "server" (mergeOverwrite (deepCopy (default (dict) $c.server)) (dict "host" "0.0.0.0" "port" (int .Values.gateway.port))) -}}
{{- $router := deepCopy (default (dict) $c.router) -}}
{{- if ne .Values.router.checkpoint.source "bundled" }}
{{- $path := .Values.router.checkpoint.mountPath -}}
{{- with .Values.router.checkpoint.subPath }}{{- $path = printf "%s/%s" (trimSuffix "/" $path) (trimPrefix "/" .) -}}{{- end }}
{{- $_ := set $router "path" $path -}}
{{- end }}
{{- $_ := set $cfg "router" $router -}}
{{- $experts := (include "octoroute.gatewayExperts" . | fromYaml).experts -}}
{{- $_ := set $cfg "experts" $experts -}}
{{- $names := list -}}
{{- range $experts }}{{- $names = append $names .name -}}{{- end }}
{{- range $field := list "default_expert" "fallback_expert" }}
{{- $v := get $c $field -}}
{{- if $v }}
{{- if not (has $v $names) }}
{{- fail (printf "gateway.config.%s %q is not an expert; known: %s (set it to one of them, or to null)" $field $v (join ", " $names)) }}
{{- end }}
{{- $_ := set $cfg $field $v -}}
{{- end }}
{{- end }}
{{- $cache := deepCopy (default (dict) $c.cache) -}}
{{- if ne .Values.redis.mode "none" }}
{{- $_ := set $cache "backend" "redis" -}}
{{- $url := include "octoroute.redisUrl" . -}}
{{- if $url }}{{- $_ := set $cache "url" $url -}}{{- end }}
{{- end }}
{{- $_ := set $cfg "cache" $cache -}}
{{- $auth := deepCopy (default (dict) $c.auth) -}}
{{- $_ := set $auth "api_keys_env" (ternary "OCTOROUTE_API_KEYS" nil .Values.auth.enabled) -}}
{{- $_ := set $cfg "auth" $auth -}}
{{- with $c.fusion }}{{- $_ := set $cfg "fusion" . -}}{{- end }}
{{- with $c.logging }}{{- $_ := set $cfg "logging" . -}}{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* ------------------------------------------------------ value cross-checks */}}
{{- define "octoroute.validate" -}}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) }}
{{- fail "redis.mode is external: set redis.external.url (redis://host:6379/0) or redis.external.existingSecret (a Secret holding the URL)" }}
{{- end }}
{{- if and (eq .Values.router.checkpoint.source "volume") (not .Values.router.checkpoint.volume) }}
{{- fail "router.checkpoint.source is volume: set router.checkpoint.volume to a volume source, e.g. {persistentVolumeClaim: {claimName: router-checkpoint}}" }}
{{- end }}
{{- if and (eq .Values.router.checkpoint.source "initContainer") (not .Values.router.checkpoint.initContainer.image) }}
{{- fail "router.checkpoint.source is initContainer: set router.checkpoint.initContainer.image (and command) to write the checkpoint into $ROUTER_DIR" }}
{{- end }}
{{- if and (eq .Values.experts.mode "external") (not .Values.secrets.existingSecret) }}
{{- range .Values.experts.external }}
{{- if and .apiKey (not (hasKey $.Values.secrets.upstreamApiKeys .name)) }}
{{- fail (printf "experts.external %q has apiKey: true but secrets.upstreamApiKeys.%s is not set (or use secrets.existingSecret with key upstream-%s)" .name .name .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.experts.mode "multiLora") .Values.experts.multiLora.baseExpert }}
{{- range .Values.experts.multiLora.adapters }}
{{- if eq .name $.Values.experts.multiLora.baseExpert }}
{{- fail (printf "experts.multiLora: adapter %q has the same name as baseExpert; served model names must be unique" .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Env of the gateway container: secrets by reference only. */}}
{{- define "octoroute.gateway.env" -}}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/hf
- name: HF_HUB_OFFLINE
  value: "1"
- name: OCTOROUTE_HOME
  value: /tmp/octoroute
{{- if .Values.auth.enabled }}
- name: OCTOROUTE_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "octoroute.secretName" . }}
      key: api-keys
{{- end }}
- name: OCTOROUTE_CACHE_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "octoroute.secretName" . }}
      key: cache-secret
      optional: true
{{- if and .Values.experts.vllm.requireApiKey (ne .Values.experts.mode "external") }}
- name: VLLM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "octoroute.secretName" . }}
      key: vllm-api-key
{{- end }}
{{- if eq .Values.experts.mode "external" }}
{{- range .Values.experts.external }}
{{- if or .apiKey (hasKey $.Values.secrets.upstreamApiKeys .name) }}
- name: {{ include "octoroute.upstreamKeyEnv" .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "octoroute.secretName" $ }}
      key: upstream-{{ .name }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.external.url) }}
- name: OCTOROUTE_CACHE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- end }}
{{- with .Values.gateway.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
