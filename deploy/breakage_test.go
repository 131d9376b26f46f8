package deploy

import (
	"strings"
	"testing"
)

// TestChecksCatchBreakage breaks the deployment files one way at a time, in memory, and
// shows that the check responsible reports it: a check that passes everything would fail
// here.
func TestChecksCatchBreakage(t *testing.T) {
	f := loadFiles(t)
	src := readCode(t)
	checks := map[string]func(files) []error{
		"compose":    func(f files) []error { return checkCompose(f, src) },
		"dockerfile": checkDockerfile,
		"k8s":        func(f files) []error { return checkKubernetes(f, src) },
		"network":    checkNetwork,
		"aws":        checkAWS,
	}
	for name, check := range checks {
		if errs := check(f); len(errs) > 0 {
			t.Fatalf("%s fails on the files as they are: %v", name, errs)
		}
	}
	const (
		compose    = "compose.yaml"
		dockerfile = "Dockerfile"
		issuer     = "k8s/issuer.yaml"
		dispatcher = "k8s/dispatcher.yaml"
		configMap  = "k8s/configmap.yaml"
		keda       = "k8s/keda.yaml"
		job        = "k8s/provision-job.yaml"
		netpol     = "k8s/network-policies.yaml"
		iamPolicy  = "aws/dispatcher-policy.json"
		queuePol   = "aws/feedback-queue-policy.json"
		eventDest  = "aws/ses-event-destination.json"
		topicPol   = "aws/sns-topic-policy.json"
	)
	for _, tc := range []struct {
		name, check, file, old, new, want string
	}{
		// compose.yaml
		{"unknown variable", "compose", compose, "OTP_LOG_LEVEL: info", "OTP_LOG_LEVL: info", "OTP_LOG_LEVL"},
		{"variable another binary reads", "compose", compose, "OTP_PROVIDERS: smtp", "OTP_PROVIDERS: smtp\n      OTP_CODE_PEPPER: ${OTP_CODE_PEPPER}", "OTP_CODE_PEPPER"},
		{"service starts before provisioning ends", "compose", compose, "condition: service_completed_successfully", "condition: service_started", "service_completed_successfully"},
		{"provisioning before NATS is healthy", "compose", compose, "      nats:\n        condition: service_healthy\n      postgres:\n        condition: service_healthy\n\n  issuer", "      nats:\n        condition: service_started\n      postgres:\n        condition: service_healthy\n\n  issuer", "provision: depends on nats"},
		{"provision runs something else", "compose", compose, `["otpflow", "provision"]`, `["otpflow", "migrate"]`, "otpflow provision"},
		{"no service health check", "compose", compose, "      - \"127.0.0.1:8081:8080\"\n    healthcheck: *healthcheck", "      - \"127.0.0.1:8081:8080\"", "issuer: no healthcheck"},
		{"health check on the wrong port", "compose", compose, "http://127.0.0.1:8080/readyz", "http://127.0.0.1:9090/readyz", "does not ask port 8080"},
		{"nats without health check", "compose", compose, `"http://127.0.0.1:8222/healthz?js-enabled-only=true"`, `"http://127.0.0.1:8223/"`, "nats: the healthcheck"},
		{"nats without JetStream", "compose", compose, `"--jetstream", `, "", "JetStream is off"},
		{"postgres without pg_isready", "compose", compose, `["CMD", "pg_isready"`, `["CMD", "true"`, "pg_isready"},
		{"root user", "compose", compose, "  user: \"65532:65532\"\n  read_only: true\n  tmpfs", "  user: \"0:0\"\n  read_only: true\n  tmpfs", "non-root"},
		{"production env", "compose", compose, "  OTP_ENV: development\n  OTP_NATS_URL", "  OTP_ENV: production\n  OTP_NATS_URL", "want development"},
		{"a key written in the file", "compose", compose, "OTP_SEAL_KEY: ${OTP_SEAL_KEY:?run sh deploy/dev-secrets.sh > deploy/.env}\n      OTP_SUBJECT_KEY: ${OTP_SUBJECT_KEY:?run sh deploy/dev-secrets.sh > deploy/.env}\n      OTP_DLQ_KEY: ${OTP_DLQ_KEY:?run sh deploy/dev-secrets.sh > deploy/.env}\n      OTP_PROVIDERS", "OTP_SEAL_KEY: k1:AAAA\n      OTP_SUBJECT_KEY: ${OTP_SUBJECT_KEY:?run sh deploy/dev-secrets.sh > deploy/.env}\n      OTP_DLQ_KEY: ${OTP_DLQ_KEY:?run sh deploy/dev-secrets.sh > deploy/.env}\n      OTP_PROVIDERS", "OTP_SEAL_KEY is written"},
		{"a required key missing", "compose", compose, "      OTP_AUDIT_SIGNING_KEY: ${OTP_AUDIT_SIGNING_KEY:?run sh deploy/dev-secrets.sh > deploy/.env}\n", "", "OTP_AUDIT_SIGNING_KEY is not set"},
		{"another service's database role", "compose", compose, "postgres://otpflow_verifier@", "postgres://otpflow_issuer@", "otpflow_verifier"},
		{"dispatcher to a sandbox", "compose", compose, "OTP_PROVIDERS: smtp", "OTP_PROVIDERS: sandbox", "want smtp"},
		{"dev secret not generated", "compose", compose, "${OTP_DLQ_KEY:?run sh deploy/dev-secrets.sh > deploy/.env}\n    ports:\n      - \"127.0.0.1:8083", "${OTP_DLQ_KEYS:?run sh deploy/dev-secrets.sh > deploy/.env}\n    ports:\n      - \"127.0.0.1:8083", "OTP_DLQ_KEYS"},
		{"unpinned image", "compose", compose, "image: postgres:18-alpine", "image: postgres:latest", "postgres: image"},

		// aws/
		{"dispatcher may write feedback", "aws", iamPolicy, `["sqs:ReceiveMessage", "sqs:DeleteMessage"]`, `["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:SendMessage"]`, "sqs:SendMessage"},
		{"dispatcher reads any queue", "aws", iamPolicy, `"arn:aws:sqs:eu-west-1:111122223333:otpflow-ses-feedback"`, `"arn:aws:sqs:eu-west-1:111122223333:*"`, "wildcard"},
		{"dispatcher reads another queue", "aws", iamPolicy, `"arn:aws:sqs:eu-west-1:111122223333:otpflow-ses-feedback"`, `"arn:aws:sqs:eu-west-1:111122223333:other"`, "the feedback queue"},
		{"any topic writes the queue", "aws", queuePol, `,
      "Condition": {"ArnEquals": {"aws:SourceArn": "arn:aws:sns:eu-west-1:111122223333:otpflow-ses-feedback"}}`, "", "aws:SourceArn"},
		{"anyone writes the queue", "aws", queuePol, `{"Service": "sns.amazonaws.com"}`, `{"AWS": "*"}`, "the SNS service alone"},
		{"account principals write the queue", "aws", queuePol, `"Effect": "Deny"`, `"Effect": "Allow"`, "allows any principal"},
		{"an inside-out grant", "aws", iamPolicy, `"Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage"]`, `"NotAction": ["sqs:SendMessage"]`, "NotAction"},
		{"mail from another identity", "aws", iamPolicy, `"arn:aws:ses:eu-west-1:111122223333:identity/acme.example",`, `"arn:aws:ses:eu-west-1:111122223333:identity/acme.example", "arn:aws:ses:eu-west-1:111122223333:identity/other.example",`, "sending identity"},
		{"anyone publishes to the topic", "aws", topicPol, `"Sid": "NobodyElsePublishes",
      "Effect": "Deny"`, `"Sid": "NobodyElsePublishes",
      "Effect": "Allow"`, "allows any principal"},
		{"SES of any account publishes", "aws", topicPol, `"StringEquals": {"aws:SourceAccount": "111122223333"},`, `"StringEquals": {"aws:SourceAccount": "444455556666"},`, "another account"},
		{"anyone subscribes", "aws", topicPol, `"StringNotEquals": {"sns:Endpoint": "arn:aws:sqs:eu-west-1:111122223333:otpflow-ses-feedback"}`, `"StringNotEquals": {"sns:Protocol": "sqs"}`, "sns:Subscribe"},
		{"bounces not published", "aws", eventDest, `"BOUNCE", `, "", "event types"},
		{"another configuration set", "aws", eventDest, `"ConfigurationSetName": "otp"`, `"ConfigurationSetName": "marketing"`, "configuration set"},
		{"topic ARN not the destination's", "aws", dispatcher, "value: arn:aws:sns:eu-west-1:111122223333:otpflow-ses-feedback", "value: arn:aws:sns:eu-west-1:111122223333:other", "OTP_SES_FEEDBACK_TOPIC_ARN"},
		{"queue URL not the policy's queue", "aws", dispatcher, "111122223333/otpflow-ses-feedback", "111122223333/otpflow-feedback", "the feedback queue"},

		// k8s/network-policies.yaml
		{"no default deny", "network", netpol, "  podSelector: {}\n  policyTypes: [Ingress, Egress]", "  podSelector: {}\n  policyTypes: [Ingress]", "denies all ingress and egress"},
		{"NATS on another port", "network", netpol, "{ protocol: TCP, port: 4222 }", "{ protocol: TCP, port: 4223 }", "may not reach NATS at nats:4222"},
		{"PostgreSQL in another namespace", "network", netpol, "kubernetes.io/metadata.name: db", "kubernetes.io/metadata.name: postgres", "may not reach PostgreSQL at db:5432"},
		{"no DNS", "network", netpol, "{ protocol: UDP, port: 53 }", "{ protocol: UDP, port: 5353 }", "may not ask kube-dns"},
		{"every service leaves the cluster", "network", netpol, "      app.kubernetes.io/name: dispatcher\n  policyTypes: [Egress]", "      app.kubernetes.io/part-of: otpflow\n  policyTypes: [Egress]", "Deployment issuer: may leave the cluster"},
		{"dispatcher cannot reach SES", "network", netpol, "{ protocol: TCP, port: 443 }", "{ protocol: TCP, port: 8443 }", "may not reach SES"},
		{"metrics closed", "network", netpol, "kubernetes.io/metadata.name: monitoring", "kubernetes.io/metadata.name: prometheus", "not reachable from the monitoring namespace"},

		// Dockerfile
		{"toolchain drift", "dockerfile", dockerfile, "GOTOOLCHAIN=go1.27.3", "GOTOOLCHAIN=go1.26.8", "GOTOOLCHAIN"},
		{"cgo", "dockerfile", dockerfile, "CGO_ENABLED=0", "CGO_ENABLED=1", "CGO_ENABLED=0"},
		{"no trimpath", "dockerfile", dockerfile, "GOFLAGS=-trimpath", "GOFLAGS=", "-trimpath"},
		{"a binary left out", "dockerfile", dockerfile, "./services/auditor/cmd/auditor ", "", "auditor"},
		{"a module's go.mod left out", "dockerfile", dockerfile, "COPY deploy/go.mod deploy/go.sum deploy/\n", "", "deploy/go.mod"},
		{"fat runtime image", "dockerfile", dockerfile, "ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot", "ARG RUNTIME_IMAGE=debian:12", "runtime stage"},
		{"root user", "dockerfile", dockerfile, "USER 65532:65532", "USER root", "numeric non-root"},

		// k8s
		{"unknown variable", "k8s", configMap, "OTP_LOG_LEVEL: info", "OTP_LOGLEVEL: info", "OTP_LOGLEVEL"},
		{"missing ConfigMap", "k8s", issuer, "configMapRef:\n                name: otpflow", "configMapRef:\n                name: otpflow-common", "ConfigMap otpflow-common"},
		{"undocumented Secret key", "k8s", issuer, "key: code-pepper", "key: pepper", "key pepper of Secret otpflow-keys"},
		{"undocumented Secret", "k8s", dispatcher, "name: otpflow-smtp", "name: otpflow-relay", "Secret otpflow-relay"},
		{"undocumented mounted Secret", "k8s", issuer, "secretName: otpflow-pg-ca", "secretName: otpflow-postgres-ca", "otpflow-postgres-ca"},
		{"a key as a value", "k8s", issuer, "            - name: OTP_SEAL_KEY\n              valueFrom:\n                secretKeyRef:\n                  name: otpflow-keys\n                  key: seal-key", "            - name: OTP_SEAL_KEY\n              value: k1:AAAA", "OTP_SEAL_KEY is a value"},
		{"a required key missing", "k8s", dispatcher, "            - name: OTP_DLQ_KEY\n              valueFrom:\n                secretKeyRef:\n                  name: otpflow-keys\n                  key: dlq-key\n", "", "OTP_DLQ_KEY is not set"},
		{"TLS file not mounted", "k8s", configMap, "OTP_NATS_TLS_CA: /etc/otpflow/nats-tls/ca.crt", "OTP_NATS_TLS_CA: /etc/ssl/nats-ca.crt", "/etc/ssl/nats-ca.crt"},
		{"mount of no volume", "k8s", issuer, "            - name: pg-ca\n              mountPath", "            - name: pg-root\n              mountPath", "volumeMount pg-root"},
		{"another service's nkey", "k8s", issuer, "secretName: otpflow-nats-nkey-issuer", "secretName: otpflow-nats-nkey-verifier", "not the issuer's own user"},
		{"another service's database certificate", "k8s", issuer, "secretName: otpflow-pg-client-issuer", "secretName: otpflow-pg-client-auditor", "client certificate"},
		{"development", "k8s", configMap, "OTP_ENV: production", "OTP_ENV: development", "want production"},
		{"NATS in plaintext", "k8s", configMap, "OTP_NATS_URL: tls://", "OTP_NATS_URL: nats://", "is not tls://"},
		{"NATS plaintext allowed", "k8s", configMap, "OTP_CONNECT_TIMEOUT: 60s", "OTP_CONNECT_TIMEOUT: 60s\n  OTP_NATS_PLAINTEXT_OK: \"true\"", "OTP_NATS_PLAINTEXT_OK=true"},
		{"NATS client key unset", "k8s", configMap, "  OTP_NATS_TLS_KEY: /etc/otpflow/nats-tls/tls.key\n", "", "OTP_NATS_TLS_KEY is not set"},
		{"PostgreSQL without verify-full", "k8s", issuer, "sslmode=verify-full", "sslmode=require", "want verify-full"},
		{"PostgreSQL as another role", "k8s", issuer, "postgres://otpflow_issuer@", "postgres://otpflow_owner@", "own role otpflow_issuer"},
		{"PostgreSQL password in a manifest", "k8s", issuer, "postgres://otpflow_issuer@", "postgres://otpflow_issuer:hunter2@", "password"},
		{"rollout surges over the SES quota", "k8s", dispatcher, "maxUnavailable: 1\n      maxSurge: 0", "maxUnavailable: 0\n      maxSurge: 1", "over the account's 100/s"},
		{"rollout surge left to the default", "k8s", dispatcher, "  strategy:\n    rollingUpdate:\n      maxUnavailable: 1\n      maxSurge: 0\n", "", "maxSurge 3"},
		{"sandbox provider", "k8s", dispatcher, "value: ses,smtp", "value: ses,sandbox", "sandbox"},
		{"plaintext SES", "k8s", dispatcher, "            - name: OTP_SES_REGION", "            - name: OTP_SES_ENDPOINT\n              value: http://ses.internal\n            - name: OTP_SES_REGION", "OTP_SES_ENDPOINT"},
		{"plaintext SES feedback queue", "k8s", dispatcher, "value: https://sqs.eu-west-1.amazonaws.com/111122223333/otpflow-ses-feedback",
			"value: http://sqs.internal/123456789012/otp-feedback", "OTP_SES_FEEDBACK_QUEUE_URL"},
		{"container port off OTP_HTTP_ADDR", "k8s", configMap, `OTP_HTTP_ADDR: ":8080"`, `OTP_HTTP_ADDR: ":9090"`, "OTP_HTTP_ADDR \":9090\""},
		{"liveness on readyz", "k8s", issuer, "          livenessProbe:\n            httpGet:\n              path: /healthz", "          livenessProbe:\n            httpGet:\n              path: /readyz", "livenessProbe asks /readyz"},
		{"readiness missing", "k8s", issuer, "          readinessProbe:\n            httpGet:\n              path: /readyz\n              port: http\n            periodSeconds: 5\n            failureThreshold: 2\n", "", "no readinessProbe"},
		{"probe on no port", "k8s", issuer, "              path: /readyz\n              port: http", "              path: /readyz\n              port: metrics", "port metrics"},
		{"no memory limit", "k8s", issuer, "            limits:\n              cpu: \"1\"\n              memory: 256Mi", "            limits:\n              cpu: \"1\"", "memory limit"},
		{"a memory request below the default GOMEMLIMIT", "k8s", issuer, "              memory: 160Mi", "              memory: 64Mi", "below the 160Mi"},
		{"no cpu request", "k8s", issuer, "            requests:\n              cpu: 100m\n", "            requests:\n", "cpu request"},
		{"writable root", "k8s", issuer, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "writable"},
		{"root pod", "k8s", issuer, "runAsNonRoot: true", "runAsNonRoot: false", "non-root"},
		{"privilege escalation", "k8s", issuer, "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", "allowPrivilegeEscalation"},
		{"image drift", "k8s", issuer, "otpflow/otpflow:v1.0.0", "otpflow/otpflow:v1.0.1", "differs"},
		{"Service selects nothing", "k8s", issuer, "  selector:\n    app.kubernetes.io/name: issuer\n  ports", "  selector:\n    app.kubernetes.io/name: issuer-api\n  ports", "Service issuer selects"},
		{"Service targets no port", "k8s", issuer, "targetPort: http", "targetPort: 8081", "targetPort 8081"},
		{"no PDB", "k8s", issuer, "kind: PodDisruptionBudget\nmetadata:\n  name: issuer", "kind: PodDisruptionBudget\nmetadata:\n  name: issuer-old", "no PodDisruptionBudget issuer"},
		{"PDB that blocks drains", "k8s", issuer, "  minAvailable: 1", "  minAvailable: 2", "minAvailable 2 of 2"},
		{"Job runs something else", "k8s", job, `command: ["otpflow", "provision"]`, `command: ["otpflow", "migrate"]`, "otpflow provision"},
		{"Job restarts forever", "k8s", job, "restartPolicy: OnFailure", "restartPolicy: Always", "restartPolicy"},
		{"Job migrate URL as a value", "k8s", job, "            - name: OTP_MIGRATE_DATABASE_URL\n              valueFrom:\n                secretKeyRef:\n                  name: otpflow-provision\n                  key: migrate-database-url", "            - name: OTP_MIGRATE_DATABASE_URL\n              value: postgres://admin@db/otp", "OTP_MIGRATE_DATABASE_URL"},
		{"no Job", "k8s", job, "name: otpflow-provision\n  namespace", "name: provision\n  namespace", "no Job otpflow-provision"},
		{"ScaledObject on another Deployment", "k8s", keda, "    name: dispatcher\n  minReplicaCount", "    name: issuer\n  minReplicaCount", "scaleTargetRef"},
		{"ScaledObject on another consumer", "k8s", keda, "consumer: dispatcher", "consumer: issuer", "not the dispatcher consumer"},
		{"ScaledObject on another stream", "k8s", keda, "stream: OTP_DISPATCH", "stream: OTP_REQUESTS", "not the dispatcher consumer"},
		{"scale to zero", "k8s", keda, "minReplicaCount: 2", "minReplicaCount: 0", "minReplicaCount must be at least 1"},
		{"more replicas, same rate", "k8s", keda, "maxReplicaCount: 10", "maxReplicaCount: 20", "OTP_SES_MAX_SEND_RATE is 10"},
		{"rate over the quota share", "k8s", dispatcher, `value: "10"`, `value: "20"`, "OTP_SES_MAX_SEND_RATE is 20"},
		{"quota undocumented", "k8s", keda, "otpflow.dev/ses-account-max-send-rate", "otpflow.dev/ses-quota", "annotation"},
		{"replicas fight KEDA", "k8s", dispatcher, "  # No replicas: the ScaledObject", "  replicas: 3\n  # No replicas: the ScaledObject", "fights KEDA"},
		{"wrong namespace", "k8s", keda, "namespace: otpflow", "namespace: default", "not in namespace otpflow"},
		{"Secret table gone", "k8s", "README.md", "| `otpflow-keys` | `audit-key` |", "| `otpflow-keys` | `audit_key` |", "key audit-key of Secret otpflow-keys"},
	} {
		t.Run(tc.check+"/"+tc.name, func(t *testing.T) {
			errs := checks[tc.check](f.with(t, tc.file, tc.old, tc.new))
			for _, err := range errs {
				if strings.Contains(err.Error(), tc.want) {
					return
				}
			}
			t.Errorf("no error mentions %q; got %v", tc.want, errs)
		})
	}
}
