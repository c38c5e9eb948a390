"""What the NATS connection's error callback treats as the noise of a TLS connection
closing, not as an error worth a warning."""

from __future__ import annotations

import ssl

from infra.adapters.nats.connection import tls_close_noise


def _ssl_error(reason: str) -> ssl.SSLError:
    e = ssl.SSLError(1, f"[SSL: {reason}] ({'_ssl.c'}:2706)")
    e.reason = reason  # (what the ssl module sets on the errors OpenSSL raises)
    return e


def test_data_after_close_notify_is_the_noise_of_a_closing_connection() -> None:
    assert tls_close_noise(_ssl_error("APPLICATION_DATA_AFTER_CLOSE_NOTIFY"))


def test_other_tls_failures_and_other_errors_are_not() -> None:
    assert not tls_close_noise(_ssl_error("CERTIFICATE_VERIFY_FAILED"))
    assert not tls_close_noise(_ssl_error("WRONG_VERSION_NUMBER"))
    assert not tls_close_noise(OSError("APPLICATION_DATA_AFTER_CLOSE_NOTIFY"))
    assert not tls_close_noise(ConnectionResetError("reset by peer"))
