package platform_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/platform"
	"go.opentelemetry.io/otel/trace"
)

// TestTracerProviderFromTheEnvironment: unset, spans are not recorded but a traceparent
// still passes through a service; set, spans go to <endpoint>/v1/traces over OTLP/HTTP and
// are flushed at shutdown; a malformed endpoint stops the start naming the variable.
func TestTracerProviderFromTheEnvironment(t *testing.T) {
	ctx := context.Background()
	parent := "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

	tp, shutdown, err := platform.NewTracerProvider(ctx, func(string) string { return "" }, "issuer")
	if err != nil {
		t.Fatal(err)
	}
	sctx, span := tp.Tracer("t").Start(platform.ContextFrom(ctx, nats.Header{"traceparent": {parent}}), "noop")
	if span.IsRecording() || platform.TraceParent(sctx) != parent {
		t.Errorf("no-op provider: recording %v, traceparent %q, want %q passed through", span.IsRecording(), platform.TraceParent(sctx), parent)
	}
	span.End()
	_ = shutdown(ctx)

	var mu sync.Mutex
	var got []string
	collector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		got = append(got, r.Method+" "+r.URL.Path+" "+r.Header.Get("Content-Type"))
		mu.Unlock()
		if len(body) == 0 {
			t.Error("empty export")
		}
		w.Header().Set("Content-Type", "application/x-protobuf")
	}))
	defer collector.Close()
	env := map[string]string{platform.OTLPEndpointVar: collector.URL}
	tp, shutdown, err = platform.NewTracerProvider(ctx, func(k string) string { return env[k] }, "issuer")
	if err != nil {
		t.Fatal(err)
	}
	sctx, span = tp.Tracer("t").Start(platform.ContextFrom(ctx, nats.Header{"traceparent": {parent}}), "issue")
	sc := trace.SpanContextFromContext(sctx)
	if !span.IsRecording() || sc.TraceID().String() != parent[3:35] || platform.TraceParent(sctx) == parent {
		t.Errorf("OTLP provider: recording %v, trace %s, traceparent %s", span.IsRecording(), sc.TraceID(), platform.TraceParent(sctx))
	}
	span.End()
	if err := shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || got[0] != "POST /v1/traces application/x-protobuf" {
		t.Errorf("collector got %q, want one OTLP/HTTP export", got)
	}

	env[platform.OTLPEndpointVar] = "collector:4318"
	_, _, err = platform.NewTracerProvider(ctx, func(k string) string { return env[k] }, "issuer")
	var ce *platform.ConfigError
	if !errors.As(err, &ce) || ce.Var != platform.OTLPEndpointVar {
		t.Errorf("malformed endpoint: err = %v", err)
	}
}
