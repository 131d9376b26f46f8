package platform

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
)

// ConsumerLag exports a durable consumer's backlog on every scrape: messages not yet
// delivered (pending), delivered and not yet acknowledged (ack_pending), and redelivered.
// Scale dispatchers on pending + ack_pending. NewConsumer registers one for every durable
// consumer it is given a registry for.
type ConsumerLag struct {
	cons                          jetstream.Consumer
	pending, ackPending, redelivs *prometheus.Desc
}

// NewConsumerLag describes the lag of cons; stream and consumer become constant labels.
func NewConsumerLag(cons jetstream.Consumer, stream, consumer string) *ConsumerLag {
	labels := prometheus.Labels{"stream": stream, "consumer": consumer}
	return &ConsumerLag{
		cons:       cons,
		pending:    prometheus.NewDesc("otpflow_consumer_pending_messages", "Messages on the stream not yet delivered to the consumer.", nil, labels),
		ackPending: prometheus.NewDesc("otpflow_consumer_ack_pending_messages", "Messages delivered and not yet acknowledged.", nil, labels),
		redelivs:   prometheus.NewDesc("otpflow_consumer_redelivered_messages", "Messages delivered more than once and not yet acknowledged.", nil, labels),
	}
}

// Describe implements prometheus.Collector.
func (c *ConsumerLag) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.pending
	ch <- c.ackPending
	ch <- c.redelivs
}

// Collect implements prometheus.Collector.
func (c *ConsumerLag) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	info, err := c.cons.Info(ctx)
	switch {
	case errors.Is(err, jetstream.ErrConsumerNotFound):
		// Deleted (provisioning retired it) and not yet let go by its service: it has
		// no lag, and one metric that cannot be collected would fail the whole scrape.
		return
	case err != nil:
		ch <- prometheus.NewInvalidMetric(c.pending, err)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.pending, prometheus.GaugeValue, float64(info.NumPending))
	ch <- prometheus.MustNewConstMetric(c.ackPending, prometheus.GaugeValue, float64(info.NumAckPending))
	ch <- prometheus.MustNewConstMetric(c.redelivs, prometheus.GaugeValue, float64(info.NumRedelivered))
}
