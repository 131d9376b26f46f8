package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime/pprof"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is one readiness check, e.g. a PostgreSQL ping.
type Check func(ctx context.Context) error

// NewRegistry returns a Prometheus registry with the Go and process collectors.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// OpsHandler serves /metrics, /healthz (the process answers) and /readyz (every check passes).
func OpsHandler(reg prometheus.Gatherer, checks map[string]Check) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		failed := false
		for name, check := range checks {
			if err := check(ctx); err != nil {
				failed = true
				fmt.Fprintf(w, "%s: %v\n", name, err)
			}
		}
		if failed {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// WithPprof serves Go's profiles beside h (OTP_PPROF): /debug/pprof/profile?seconds=N
// (CPU, default 30 s, at most 120) and /debug/pprof/<name> for runtime/pprof's named
// profiles (allocs, heap, goroutine, mutex, block, threadcreate). Written here rather than
// imported from net/http/pprof, whose init registers the handlers on
// http.DefaultServeMux in every binary that imports it.
func WithPprof(h http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /debug/pprof/profile", func(w http.ResponseWriter, r *http.Request) {
		secs := 30
		if v := r.URL.Query().Get("seconds"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 120 {
				http.Error(w, "seconds must be from 1 to 120", http.StatusBadRequest)
				return
			}
			secs = n
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		if err := pprof.StartCPUProfile(w); err != nil {
			http.Error(w, err.Error(), http.StatusConflict) // another profile is running
			return
		}
		select {
		case <-time.After(time.Duration(secs) * time.Second):
		case <-r.Context().Done():
		}
		pprof.StopCPUProfile()
	})
	mux.HandleFunc("GET /debug/pprof/{name}", func(w http.ResponseWriter, r *http.Request) {
		p := pprof.Lookup(r.PathValue("name"))
		if p == nil {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		_ = p.WriteTo(w, 0)
	})
	mux.Handle("/", h)
	return mux
}

// ServeOps listens on addr and serves h until ctx is cancelled, then shuts down. It sends
// the bound address on bound (useful with ":0"), if bound is not nil.
func ServeOps(ctx context.Context, addr string, h http.Handler, log *slog.Logger, bound chan<- string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return &ConfigError{"OTP_HTTP_ADDR", err.Error()}
	}
	if bound != nil {
		bound <- ln.Addr().String()
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	log.Info("serving /metrics /healthz /readyz", "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		shutCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(shutCtx); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}
}
