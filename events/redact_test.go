package events_test

import (
	"fmt"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/otpflow/otpflow/events"
)

func TestRedactAddresses(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"plain", "rejected ana@example.com", "rejected <address>"},
		{"angle brackets", "RCPT TO:<ana@example.com> refused", "RCPT TO:<address> refused"},
		{"SMTP enhanced status text",
			"550 5.1.1 <ana@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
			"550 5.1.1 <address>: Recipient address rejected: User unknown in virtual mailbox table"},
		{"go-mail SendError",
			"failed to set mail recipient: 550 5.1.1 <ana@example.com>: Recipient address rejected, affected recipient(s): ana@example.com, affected message ID: <1751.42@mx.acme.example>",
			"failed to set mail recipient: 550 5.1.1 <address>: Recipient address rejected, affected recipient(s): <address>, affected message ID: <address>"},
		{"SES unverified identity",
			"MessageRejected: Email address is not verified. The following identities failed the check in region EU-WEST-1: ana@example.com, no-reply@acme.example",
			"MessageRejected: Email address is not verified. The following identities failed the check in region EU-WEST-1: <address>, <address>"},
		{"several", "ana@example.com;bo.b+otp@mail.example.org,c@d.io", "<address>;<address>,<address>"},
		{"glued to punctuation", "(ana@example.com). 'ana@example.com'! to:ana@example.com?", "(<address>). <address>'! to:<address>?"},
		{"full stop after the domain", "no mailbox ana@example.com.", "no mailbox <address>."},
		{"atext specials", "a!#$%&'*+/=?^_`{|}~-@example.com", "<address>"},
		{"unicode local part", "josé.müller@example.de and 用户@例子.广告 and Δοκιμή@παράδειγμα.δοκιμή", "<address> and <address> and <address>"},
		{"decomposed accent in the domain", "ana@exe\u0301mple.com", "<address>"},
		{"punycode domain", "ana@xn--exmple-cua.com", "<address>"},
		{"escaped by %q", `550 "5.1.1 <jos\u00e9@ex\u00e4mple.de>: rejected"`, `550 "5.1.1 <address>: rejected"`},
		{"quoted local part", `rejected "ana smith"@example.com, sorry`, "rejected <address>, sorry"},
		{"quoted local part with escapes", `"ana\"s@home"@example.com`, "<address>"},
		{"quoted in angle brackets", `<"ana smith"@example.com>`, "<address>"},
		{"address literal", "ana@[192.0.2.1] and ana@[IPv6:2001:db8::1]", "<address> and <address>"},
		{"doubled at", "ana@evil@example.com", "<address>"},
		{"in a URL", "smtp://user:secret@relay.example:587", "smtp://user:<address>:587"},
		{"control characters around", "\x00ana@example.com\x7f", "\x00<address>\x7f"},
		{"not UTF-8", "\xffana\xfe@exa\xffmple.com", "<address>"},
		{"no address", "454 4.7.0 Throttling failure: Maximum sending rate exceeded.", "454 4.7.0 Throttling failure: Maximum sending rate exceeded."},
		{"at without a local part", "see @example and x @ y", "see @example and x @ y"},
		{"at without a domain", "ana@ rejected, ana@. too", "ana@ rejected, ana@. too"},
		{"empty", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := events.RedactAddresses(tt.in); got != tt.want {
				t.Fatalf("RedactAddresses(%q)\n got %q\nwant %q", tt.in, got, tt.want)
			}
		})
	}
}

// FuzzRedactAddresses checks, for any text, that no '@' is left between a local part and
// a domain, that a second pass changes nothing, and that text without '@' is untouched.
func FuzzRedactAddresses(f *testing.F) {
	for _, s := range []string{
		"550 5.1.1 <ana@example.com>: Recipient address rejected",
		`"ana smith"@example.com`, `"a\"b"@x.y`, "ana@[192.0.2.1]", "a@b@c", "@@x", "a@b@",
		"josé@例子.广告", "\xffa@b", `x"@y "a@b"@c`, "<a@b>@c", "plain text",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		out := events.RedactAddresses(s)
		if !strings.Contains(s, "@") && out != s {
			t.Fatalf("changed text without '@': %q -> %q", s, out)
		}
		if again := events.RedactAddresses(out); again != out {
			t.Fatalf("not idempotent: %q -> %q -> %q", s, out, again)
		}
		for i := strings.IndexByte(out, '@'); i >= 0; i = nextAt(out, i) {
			before, _ := utf8.DecodeLastRuneInString(out[:i])
			after, _ := utf8.DecodeRuneInString(out[i+1:])
			if i > 0 && i+1 < len(out) && (isLocalRune(before) || before == '"') && (unicode.IsLetter(after) || unicode.IsDigit(after)) {
				t.Fatalf("address left at %d: %q -> %q", i, s, out)
			}
		}
	})
}

// FuzzRedactEmbeddedAddress builds an address from any local part and domain and checks
// it is replaced, with its delimiters, in the contexts provider errors put it in.
func FuzzRedactEmbeddedAddress(f *testing.F) {
	f.Add("ana", "example.com")
	f.Add("josé.müller+otp", "exämple.de")
	f.Add("a'b", "xn--bcher-kva.example")
	f.Fuzz(func(t *testing.T, local, domain string) {
		local = strings.Map(func(r rune) rune {
			if !isLocalRune(r) {
				return -1
			}
			return r
		}, local)
		domain = strings.TrimRight(strings.Map(func(r rune) rune {
			if unicode.IsLetter(r) || unicode.IsDigit(r) || r == '.' || r == '-' {
				return r
			}
			return -1
		}, domain), ".")
		first, _ := utf8.DecodeRuneInString(domain)
		if local == "" || !unicode.IsLetter(first) && !unicode.IsDigit(first) {
			t.Skip()
		}
		addr := local + "@" + domain
		for _, format := range []string{"%s", "550 5.1.1 <%s>: rejected", "(%s),", "failed: %s.", `"%s"`} {
			in := fmt.Sprintf(format, addr)
			want := strings.Replace(format, "<%s>", "%s", 1)
			want = fmt.Sprintf(want, events.RedactedAddress)
			if got := events.RedactAddresses(in); got != want {
				t.Fatalf("RedactAddresses(%q) = %q, want %q", in, got, want)
			}
		}
	})
}

func nextAt(s string, i int) int {
	j := strings.IndexByte(s[i+1:], '@')
	if j < 0 {
		return -1
	}
	return i + 1 + j
}

// isLocalRune mirrors what the redactor takes for a character of an unquoted local part.
func isLocalRune(r rune) bool {
	return !unicode.IsSpace(r) && !unicode.IsControl(r) && !strings.ContainsRune(`@()<>[]:;,"`, r)
}

func ExampleRedactAddresses() {
	fmt.Println(events.RedactAddresses("550 5.1.1 <ana@example.com>: Recipient address rejected: User unknown"))
	// Output: 550 5.1.1 <address>: Recipient address rejected: User unknown
}

func TestReason(t *testing.T) {
	for _, tt := range []struct {
		in   string
		n    int
		want string
	}{
		{"550 5.1.1 <ana@example.com>: unknown", 500, "550 5.1.1 <address>: unknown"},
		{"550 <ana@example.com> rejected", 9, "550 <addr"},
		{"Zustellung für Jürgen fehlgeschlagen", 16, "Zustellung für "},
		{"äää", 3, "ä"},
		{"", 10, ""},
	} {
		got := events.Reason(tt.in, tt.n)
		if got != tt.want || !utf8.ValidString(got) || len(got) > tt.n {
			t.Errorf("Reason(%q, %d) = %q, want %q", tt.in, tt.n, got, tt.want)
		}
	}
}

func TestRedactIPs(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"ipv4 with port", "dial tcp 203.0.113.7:2525: connect: connection refused", "dial tcp <ip>:2525: connect: connection refused"},
		{"ipv4 in brackets", "550 5.7.1 Client host [198.51.100.23] blocked", "550 5.7.1 Client host [<ip>] blocked"},
		{"ipv4 at the end of a sentence", "from 192.0.2.1.", "from <ip>."},
		{"quoted by a database", `invalid input syntax for type inet: "203.0.113.7"`, `invalid input syntax for type inet: "<ip>"`},
		{"ipv6", "host 2001:db8::1 and [2001:db8:0:0:0:0:0:1]:25", "host <ip> and [<ip>]:25"},
		{"ipv6 with a zone", "fe80::1%eth0 unreachable", "<ip> unreachable"},
		{"ipv4-mapped ipv6", "from ::ffff:192.0.2.1", "from <ip>"},
		{"two", "1.2.3.4:25,5.6.7.8", "<ip>:25,<ip>"},
		{"a time of day", "at 10:02:03 the relay said", "at 10:02:03 the relay said"},
		{"a version", "go1.27.3 v1.2.3", "go1.27.3 v1.2.3"},
		{"not an address", "999.1.1.1", "999.1.1.1"},
		{"inside a word", "std::string", "std::string"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := events.RedactIPs(tc.in); got != tc.want {
				t.Errorf("RedactIPs(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
	if got := events.Reason("<ana@example.com> from [203.0.113.7]", 100); got != "<address> from [<ip>]" {
		t.Errorf("Reason = %q", got)
	}
}
