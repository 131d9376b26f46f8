package main

import (
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// BenchmarkPipeline publishes b.N requests at once into the whole pipeline (in-process
// services, embedded NATS, real PostgreSQL, real SMTP server) and reports how fast they
// were issued (otp.issued stored) and mailed (otp.delivered stored).
//
//	cd cmd/otpflow && go test -run '^$' -bench Pipeline -benchtime 3000x
func BenchmarkPipeline(b *testing.B) {
	for _, c := range []string{"16", "64"} {
		b.Run("concurrency-"+c, func(b *testing.B) { benchPipeline(b, c) })
	}
}

func benchPipeline(b *testing.B, concurrency string) {
	w := newWorld(b)
	w.env["OTP_DISPATCH_CONCURRENCY"] = concurrency
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- runPipeline(ctx, w.getenv, io.Discard) }()
	defer func() { cancel(); <-done }()
	_, js := testenv.JetStream(b, w.nats)

	count := func(filter string) int {
		st, err := js.Stream(context.Background(), events.StreamEvents)
		if err != nil {
			return 0
		}
		info, err := st.Info(context.Background(), jetstream.WithSubjectFilter(filter+".bench"))
		if err != nil {
			return 0
		}
		return int(info.State.Subjects[filter+".bench"])
	}
	// Warm up: the services are consuming once one request went all the way.
	_, err := js.Publish(context.Background(), "otp.requested.bench", []byte(`{"request_id":"warm","recipient":"w@example.com","purpose":"login"}`))
	testenv.Must(b, err, "warm up")
	testenv.Eventually(b, 30*time.Second, "warm-up delivery", func() bool { return count("otp.delivered") == 1 })

	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		body := fmt.Sprintf(`{"request_id":"b-%d","recipient":"u%d@example.com","purpose":"login"}`, i, i)
		if _, err := js.PublishAsync("otp.requested.bench", []byte(body)); err != nil {
			b.Fatal(err)
		}
	}
	<-js.PublishAsyncComplete()
	var issuedAt time.Duration
	testenv.Eventually(b, 10*time.Minute, "all issued", func() bool { return count("otp.issued") == b.N+1 })
	issuedAt = time.Since(start)
	testenv.Eventually(b, 10*time.Minute, "all delivered", func() bool { return count("otp.delivered") == b.N+1 })
	deliveredAt := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/issuedAt.Seconds(), "issued/s")
	b.ReportMetric(float64(b.N)/deliveredAt.Seconds(), "delivered/s")
}
