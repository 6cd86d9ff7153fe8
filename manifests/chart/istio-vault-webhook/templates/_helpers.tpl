{{/* Labels: the kustomize base's two, plus Helm's own. */}}
{{- define "ivw.labels" -}}
app.kubernetes.io/name: istio-vault-webhook
app.kubernetes.io/part-of: istio-vault-webhook
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ivw.istiod" -}}
{{- $istiod := .Values.config.profiles.istiod | default dict -}}
{{- toJson (dict
  "match" ($istiod.match | default (dict "app" "istiod"))
  "container" ($istiod.container | default "discovery")) -}}
{{- end -}}

{{/* A label selector as CEL over object.metadata.labels. */}}
{{- define "ivw.selectorCel" -}}
{{- $parts := list -}}
{{- range $k, $v := . -}}
{{- $parts = append $parts (printf "('%s' in object.metadata.labels && object.metadata.labels['%s'] == '%s')" $k $k $v) -}}
{{- end -}}
{{- join " && " $parts -}}
{{- end -}}

{{/*
The webhook's match condition: istiod (app: istiod always reaches us, so that it is denied when no
valid config is loaded) and the Istio gateways, as in the kustomize base, plus every profile
selector those two clauses do not already cover: a new gateway profile cannot be forgotten here.
*/}}
{{- define "ivw.matchCondition" -}}
{{- $extra := list -}}
{{- $profiles := .Values.config.profiles | default dict -}}
{{- $selectors := list -}}
{{- if $profiles.istiod }}{{ $selectors = append $selectors (fromJson (include "ivw.istiod" .)).match }}{{ end -}}
{{- range $profiles.gateways | default list }}{{ $selectors = append $selectors .match }}{{ end -}}
{{- range $selectors -}}
{{- $covered := or (eq (toString (get . "app")) "istiod") (has (toString (get . "istio")) (list "ingressgateway" "egressgateway")) -}}
{{- if not $covered }}{{ $extra = append $extra (printf "(%s)" (include "ivw.selectorCel" .)) }}{{ end -}}
{{- end -}}
{{- $base := "('app' in object.metadata.labels && object.metadata.labels['app'] == 'istiod') || ('istio' in object.metadata.labels && object.metadata.labels['istio'] in ['ingressgateway', 'egressgateway'])" -}}
{{- printf "has(object.metadata.labels) && (%s)" (join " || " (prepend $extra $base)) -}}
{{- end -}}

{{/* What `check` refuses and JSON Schema cannot say: repeated gateway names and selectors. */}}
{{- define "ivw.validate" -}}
{{- $names := dict -}}
{{- $selectors := dict -}}
{{- $profiles := .Values.config.profiles | default dict -}}
{{- if $profiles.istiod }}{{ $_ := set $selectors (toJson (fromJson (include "ivw.istiod" .)).match) "istiod" }}{{ end -}}
{{- range $i, $g := $profiles.gateways | default list -}}
{{- if hasKey $names $g.name }}{{ fail (printf "config.profiles.gateways[%d].name: %q is used twice; profile names must be unique" $i $g.name) }}{{ end -}}
{{- $_ := set $names $g.name true -}}
{{- $key := toJson $g.match -}}
{{- if hasKey $selectors $key }}{{ fail (printf "config.profiles.gateways[%d] (%s).match: same selector %s as profile %q; one of the two could never apply" $i $g.name $key (get $selectors $key)) }}{{ end -}}
{{- $_ := set $selectors $key $g.name -}}
{{- end -}}
{{- $kv := int (.Values.config.vault.kvVersion | default 1) -}}
{{- if and (eq $kv 1) $profiles.istiod (get ($profiles.istiod | default dict) "renderInterval") }}{{ fail "config.profiles.istiod.renderInterval: has no effect with vault.kvVersion 1 (the agent re-reads a KV v1 secret after about 90% of its lease): put a ttl key in the secret instead, or use kvVersion: 2" }}{{ end -}}
{{- range $i, $g := $profiles.gateways | default list -}}
{{- if and (eq $kv 1) (get $g "renderInterval") }}{{ fail (printf "config.profiles.gateways[%d].renderInterval: has no effect with vault.kvVersion 1 (the agent re-reads a KV v1 secret after about 90%% of its lease): put a ttl key in the secret instead, or use kvVersion: 2" $i) }}{{ end -}}
{{- end -}}
{{- if and (not .Values.vaultInjector.reinvoked) (ge .Values.webhook.name .Values.vaultInjector.configName) -}}
{{- fail (printf "webhook.name %q does not sort before the Vault injector's configuration %q, which would then run first and miss our annotations: rename it, or give %q reinvocationPolicy: IfNeeded and set vaultInjector.reinvoked=true" .Values.webhook.name .Values.vaultInjector.configName .Values.vaultInjector.configName) -}}
{{- end -}}
{{- end -}}
