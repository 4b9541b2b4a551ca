{{- define "radfm.labels" -}}
app.kubernetes.io/name: radfm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "radfm.selector" -}}
app.kubernetes.io/name: radfm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
