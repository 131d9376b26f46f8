// Package ses sends OTP mail through Amazon SES v2 with aws-sdk-go-v2.
//
// The SDK's own retryer is switched off (aws.NopRetryer): SES has no idempotency key, so
// every hidden SDK retry of a timed-out or 5xx SendEmail can mail a code twice, and its
// throttle retries would hide 429s from the dispatcher's token bucket and spend the send
// rate twice. The dispatcher owns the only retry loop (short backoff per provider, then
// failover, then JetStream redelivery).
package ses

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptrace"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sesv2"
	"github.com/aws/aws-sdk-go-v2/service/sesv2/types"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
)

// API is what the provider calls on the SES v2 client.
type API interface {
	SendEmail(ctx context.Context, in *sesv2.SendEmailInput, optFns ...func(*sesv2.Options)) (*sesv2.SendEmailOutput, error)
}

// Config of the SES provider.
type Config struct {
	Region           string // OTP_SES_REGION
	Endpoint         string // OTP_SES_ENDPOINT: an emulator or a VPC endpoint; empty = AWS
	ConfigurationSet string // OTP_SES_CONFIGURATION_SET
	// Timeout bounds one SendEmail call; default 5s.
	Timeout time.Duration
}

// NewClient builds an SES v2 client with credentials from the standard AWS chain, no SDK
// retries, and an HTTP client with dial, TLS and response-header timeouts.
func NewClient(ctx context.Context, cfg Config) (*sesv2.Client, error) {
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Second
	}
	// The SDK's buildable client keeps AWS_CA_BUNDLE support working.
	httpClient := awshttp.NewBuildableClient().
		WithDialerOptions(func(d *net.Dialer) { d.Timeout = 2 * time.Second }).
		WithTransportOptions(func(t *http.Transport) {
			t.TLSHandshakeTimeout = 3 * time.Second
			t.ResponseHeaderTimeout = cfg.Timeout
			t.MaxIdleConnsPerHost = 64
		})
	opts := []func(*awsconfig.LoadOptions) error{
		awsconfig.WithRetryer(func() aws.Retryer { return aws.NopRetryer{} }),
		awsconfig.WithHTTPClient(httpClient),
	}
	if cfg.Region != "" {
		opts = append(opts, awsconfig.WithRegion(cfg.Region))
	}
	awsCfg, err := awsconfig.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("ses: load AWS config: %w", err)
	}
	if awsCfg.Region == "" {
		return nil, errors.New("ses: no region: set OTP_SES_REGION or AWS_REGION")
	}
	return sesv2.NewFromConfig(awsCfg, func(o *sesv2.Options) {
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
	}), nil
}

// Provider is the "ses" provider.
type Provider struct {
	api API
	cfg Config
}

// New returns an SES provider on api (an *sesv2.Client).
func New(api API, cfg Config) *Provider {
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Second
	}
	return &Provider{api: api, cfg: cfg}
}

// Name implements mailer.Provider.
func (p *Provider) Name() string { return "ses" }

var tagValue = regexp.MustCompile(`[^0-9A-Za-z_-]`)

// Send implements mailer.Provider with one SendEmail call (Simple content: SES builds the
// MIME message; our headers ride along).
func (p *Provider) Send(ctx context.Context, m *mailer.Message) (mailer.Receipt, error) {
	in := &sesv2.SendEmailInput{
		FromEmailAddress: aws.String(m.From),
		Destination:      &types.Destination{ToAddresses: []string{m.To}},
		Content: &types.EmailContent{Simple: &types.Message{
			Subject: &types.Content{Data: aws.String(m.Subject), Charset: aws.String("UTF-8")},
			Body: &types.Body{
				Text: &types.Content{Data: aws.String(m.Text), Charset: aws.String("UTF-8")},
			},
		}},
	}
	if m.HTML != "" {
		in.Content.Simple.Body.Html = &types.Content{Data: aws.String(m.HTML), Charset: aws.String("UTF-8")}
	}
	for k, v := range m.Headers {
		in.Content.Simple.Headers = append(in.Content.Simple.Headers, types.MessageHeader{Name: aws.String(k), Value: aws.String(v)})
	}
	for k, v := range m.Tags {
		// SES accepts only [0-9A-Za-z_-] in tag names and values.
		in.EmailTags = append(in.EmailTags, types.MessageTag{Name: aws.String(tagValue.ReplaceAllString(k, "_")), Value: aws.String(tagValue.ReplaceAllString(v, "_"))})
	}
	if p.cfg.ConfigurationSet != "" {
		in.ConfigurationSetName = aws.String(p.cfg.ConfigurationSet)
	}

	// Whether the request reached the wire decides between "nothing handed over" (safe to
	// fail over) and "ambiguous" (SES may have accepted it).
	var wrote atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) { wrote.Store(true) }})
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	out, err := p.api.SendEmail(ctx, in)
	if err != nil {
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: Classify(err, wrote.Load()), Err: err}
	}
	return mailer.Receipt{MessageID: aws.ToString(out.MessageId)}, nil
}

// Classify maps a SendEmail error to a failure class. handedOver says whether the request
// was written to the connection.
func Classify(err error, handedOver bool) mailer.Class {
	var (
		tooMany   *types.TooManyRequestsException
		limit     *types.LimitExceededException
		paused    *types.SendingPausedException
		suspended *types.AccountSuspendedException
		mailFrom  *types.MailFromDomainNotVerifiedException
		notFound  *types.NotFoundException
		rejected  *types.MessageRejected
		bad       *types.BadRequestException
		internal  *types.InternalServiceErrorException
		apiErr    smithy.APIError
		respErr   *smithyhttp.ResponseError
	)
	switch {
	case errors.As(err, &tooMany):
		return mailer.Throttled
	case errors.As(err, &limit):
		return mailer.QuotaExhausted
	case errors.As(err, &paused), errors.As(err, &suspended), errors.As(err, &mailFrom), errors.As(err, &notFound):
		return mailer.ProviderDown
	case errors.As(err, &rejected):
		// In the SES sandbox an unverified sender or recipient is refused as
		// MessageRejected: that is our configuration, not this message.
		if strings.Contains(strings.ToLower(rejected.ErrorMessage()), "not verified") {
			return mailer.ProviderDown
		}
		return mailer.Permanent
	case errors.As(err, &bad):
		return mailer.Permanent
	case errors.As(err, &internal):
		return mailer.Transient
	case errors.As(err, &apiErr):
		code, msg := apiErr.ErrorCode(), strings.ToLower(apiErr.ErrorMessage())
		switch {
		case code == "Throttling" || code == "ThrottlingException":
			if strings.Contains(msg, "daily") {
				return mailer.QuotaExhausted
			}
			return mailer.Throttled
		case code == "AccessDeniedException" || code == "UnrecognizedClientException" ||
			code == "InvalidClientTokenId" || code == "SignatureDoesNotMatch" || code == "ExpiredTokenException":
			return mailer.ProviderDown
		}
		if errors.As(err, &respErr) && respErr.HTTPStatusCode() > 0 {
			return classifyStatus(respErr.HTTPStatusCode())
		}
		return mailer.Transient
	case errors.As(err, &respErr) && respErr.HTTPStatusCode() > 0:
		return classifyStatus(respErr.HTTPStatusCode())
	}
	// No HTTP answer at all.
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &dnsErr):
		return mailer.ProviderDown
	case handedOver:
		return mailer.Ambiguous
	case isRefused(err):
		return mailer.ProviderDown
	}
	return mailer.Transient
}

func classifyStatus(status int) mailer.Class {
	switch {
	case status == http.StatusTooManyRequests:
		return mailer.Throttled
	case status == http.StatusUnauthorized || status == http.StatusForbidden || status == http.StatusNotFound:
		return mailer.ProviderDown
	case status >= 500:
		return mailer.Transient
	case status >= 400:
		return mailer.Permanent
	}
	return mailer.Transient
}

func isRefused(err error) bool {
	var opErr *net.OpError
	return errors.As(err, &opErr) && opErr.Op == "dial" && !opErr.Timeout()
}

// GetAccount is the part of the SES client used to read the send quota.
type GetAccount interface {
	GetAccount(ctx context.Context, in *sesv2.GetAccountInput, optFns ...func(*sesv2.Options)) (*sesv2.GetAccountOutput, error)
}

// MaxSendRate reads the account's send rate (messages per second) from GetAccount.
func MaxSendRate(ctx context.Context, api GetAccount) (float64, error) {
	out, err := api.GetAccount(ctx, &sesv2.GetAccountInput{})
	if err != nil {
		return 0, err
	}
	if out.SendQuota == nil || out.SendQuota.MaxSendRate <= 0 {
		return 0, errors.New("ses: GetAccount returned no send quota")
	}
	return out.SendQuota.MaxSendRate, nil
}
