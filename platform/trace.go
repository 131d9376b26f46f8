package platform

import (
	"context"
	"fmt"
	"net/url"
	"runtime/debug"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Traces: every message carries a W3C traceparent header (events.NewMsg writes it). A
// service continues the trace of what it handles with a span of its own, and what it
// publishes carries that span's traceparent, so one request is one trace across the
// services. OpenTelemetry lives here and in the services, never in events: the header is
// the contract.

// OTLPEndpointVar turns tracing on: the base URL of an OTLP/HTTP collector
// ("http://otel-collector:4318"); spans go to <it>/v1/traces. Unset, spans are not
// recorded (a no-op provider) but traceparents still pass through. The exporter reads
// the other OTEL_EXPORTER_OTLP_* variables (headers, timeout, certificates) itself.
const OTLPEndpointVar = "OTEL_EXPORTER_OTLP_ENDPOINT"

type tracerProviderKey struct{}

// WithTracerProvider makes the runner (RunServices) give every service tracers of tp
// instead of the provider OTEL_EXPORTER_OTLP_ENDPOINT configures: tests pass an
// in-process recorder. The caller shuts tp down.
func WithTracerProvider(ctx context.Context, tp trace.TracerProvider) context.Context {
	return context.WithValue(ctx, tracerProviderKey{}, tp)
}

// NewTracerProvider returns the tracer provider of service: the one WithTracerProvider
// put in ctx, else an OTLP/HTTP exporter when OTEL_EXPORTER_OTLP_ENDPOINT is set (with
// service.name the service and service.version the build's), else a no-op. shutdown
// flushes what is buffered; it is bounded by its context.
func NewTracerProvider(ctx context.Context, getenv Getenv, service string) (tp trace.TracerProvider, shutdown func(context.Context) error, err error) {
	none := func(context.Context) error { return nil }
	if tp, ok := ctx.Value(tracerProviderKey{}).(trace.TracerProvider); ok {
		return tp, none, nil
	}
	endpoint := strings.TrimSpace(getenv(OTLPEndpointVar))
	if endpoint == "" {
		return noop.NewTracerProvider(), none, nil
	}
	u, err := url.Parse(endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, nil, &ConfigError{OTLPEndpointVar, "must be an http:// or https:// URL of an OTLP/HTTP collector"}
	}
	u.Path = strings.TrimSuffix(u.Path, "/") + "/v1/traces"
	exp, err := otlptracehttp.New(ctx, otlptracehttp.WithEndpointURL(u.String()))
	if err != nil {
		return nil, nil, fmt.Errorf("OTLP trace exporter: %w", err)
	}
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(
		attribute.String("service.name", service),
		attribute.String("service.namespace", "otpflow"),
		attribute.String("service.version", buildVersion()),
	))
	if err != nil {
		return nil, nil, fmt.Errorf("trace resource: %w", err)
	}
	sdk := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	return sdk, sdk.Shutdown, nil
}

// stopTraces flushes a tracer provider on the way out, for at most a few seconds: a
// collector that is down must not hold up the exit.
func stopTraces(shutdown func(context.Context) error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = shutdown(ctx)
}

// buildVersion is the main module's version, else the VCS revision go build stamped,
// else "devel".
func buildVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := info.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	for _, s := range info.Settings {
		if s.Key == "vcs.revision" {
			return s.Value
		}
	}
	return "devel"
}

// Tracer is t, or a no-op tracer when t is nil (a service built without the runner).
func Tracer(t trace.Tracer) trace.Tracer {
	if t == nil {
		return noop.NewTracerProvider().Tracer("")
	}
	return t
}

// traceContext reads and writes the W3C traceparent (and tracestate) headers.
var traceContext propagation.TraceContext

// headerCarrier lets the propagator read and write NATS headers, whose keys are case
// sensitive: "traceparent" as events.HeaderTraceParent spells it.
type headerCarrier nats.Header

func (c headerCarrier) Get(key string) string { return nats.Header(c).Get(key) }
func (c headerCarrier) Set(key, value string) { nats.Header(c).Set(key, value) }
func (c headerCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

// ContextFrom returns ctx carrying, as the remote parent of the next span started in it,
// the span context of h's traceparent; ctx unchanged when h has none (a new trace).
func ContextFrom(ctx context.Context, h nats.Header) context.Context {
	if h == nil {
		return ctx
	}
	return traceContext.Extract(ctx, headerCarrier(h))
}

// ParseTraceParent is the span context a W3C traceparent names, marked remote; invalid
// when s is empty or malformed. A span links to it with trace.Link.
func ParseTraceParent(s string) trace.SpanContext {
	return trace.SpanContextFromContext(ContextFrom(context.Background(), nats.Header{"traceparent": {s}}))
}

// TraceParent is the W3C traceparent of ctx's span, for events.Envelope: a message
// published with it is that span's child. Empty when ctx has no valid span.
func TraceParent(ctx context.Context) string {
	h := nats.Header{}
	traceContext.Inject(ctx, headerCarrier(h))
	return h.Get("traceparent")
}

// StartSpan starts the consumer span of handling d in tr: a child of the span that
// published the message (its traceparent), or the root of a new trace. It carries the
// subject and stream position, never the body.
func (d *Delivery) StartSpan(ctx context.Context, tr trace.Tracer, name string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	attrs = append(attrs,
		attribute.String("messaging.system", "nats"),
		attribute.String("messaging.destination.name", d.Subject()),
		attribute.Int64("messaging.nats.stream_sequence", int64(d.meta.Sequence)),
		attribute.Int64("messaging.nats.num_delivered", int64(d.meta.NumDelivered)),
	)
	if d.c != nil {
		attrs = append(attrs, attribute.String("messaging.consumer.group.name", d.c.cfg.Name))
	}
	return Tracer(tr).Start(ContextFrom(ctx, d.Headers()), name,
		trace.WithSpanKind(trace.SpanKindConsumer), trace.WithAttributes(attrs...))
}
