//! Credentials out of connection strings, for logs, errors and `Debug`.

use std::fmt;

/// The connection string with every credential replaced by `***`, for logs, errors and `Debug`.
///
/// Covers the forms PostgreSQL and RabbitMQ accept:
/// - URLs (`postgres://`, `postgresql://`, `amqp://`, `amqps://`, any `scheme://`): the whole
///   user info before the host, and query parameters that carry a password or secret
///   (`?password=`, `?sslpassword=`);
/// - libpq key/value strings (`host=db password=secret`, quoted `password='a b'`).
///
/// ```
/// use oncely_core::redact_url;
/// assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://***@127.0.0.1:5672/%2f");
/// assert_eq!(redact_url("postgres://127.0.0.1/db"), "postgres://127.0.0.1/db");
/// assert_eq!(redact_url("postgres://db/app?password=secret"), "postgres://db/app?password=***");
/// assert_eq!(redact_url("host=db password='a b' user=app"), "host=db password=*** user=app");
/// assert_eq!(
///     redact_url("amqp://u:p,w@a:5672/%2f,amqp://u:q@b:5672/%2f"),
///     "amqp://***@a:5672/%2f,amqp://***@b:5672/%2f"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    // A list of broker URLs (`amqp://a,amqp://b`): each one redacted.
    let starts = list_starts(url);
    if starts.len() > 1 {
        let mut out = String::with_capacity(url.len());
        for (i, (start, _)) in starts.iter().enumerate() {
            let end = starts.get(i + 1).map_or(url.len(), |(_, comma)| *comma);
            if i > 0 {
                out.push(',');
            }
            out.push_str(&redact_one(&url[*start..end]));
        }
        return out;
    }
    redact_one(url)
}

/// Where each URL of a comma-separated list starts, with the comma before it: at 0 and after
/// every comma followed by a `scheme://` (a comma inside a password or a query does not split).
fn list_starts(url: &str) -> Vec<(usize, usize)> {
    let mut starts = vec![(0, 0)];
    for (comma, _) in url.match_indices(',') {
        let next = url[comma + 1..].trim_start();
        let offset = url.len() - next.len();
        let scheme_len = next.find("://").filter(|n| {
            *n > 0
                && next[..*n]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        });
        if scheme_len.is_some() {
            starts.push((offset, comma));
        }
    }
    starts
}

fn redact_one(url: &str) -> String {
    match url.find("://") {
        Some(scheme) => redact_uri(url, scheme + 3),
        None if url.contains('=') => redact_conninfo(url),
        None => url.to_owned(),
    }
}

/// A connection string that shows itself redacted in `Debug` and `Display`, so a struct holding
/// one can derive or write `Debug` without leaking the password.
///
/// ```
/// let url = oncely_core::RedactedUrl("amqp://app:secret@rabbit/%2f");
/// assert_eq!(format!("{url:?}"), "\"amqp://***@rabbit/%2f\"");
/// ```
#[derive(Clone, Copy)]
pub struct RedactedUrl<'a>(pub &'a str);

impl fmt::Debug for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(self.0), f)
    }
}

impl fmt::Display for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(self.0))
    }
}

/// Query parameters and conninfo keys whose value is a credential. `sslpassword` is libpq's
/// client key passphrase; the rest are spellings drivers accept.
fn is_secret_key(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.contains("token")
        || matches!(key.as_str(), "pass" | "passwd" | "pwd")
}

/// `authority` starts after `scheme://`. As URL parsers do, the authority ends at the first `/`,
/// `?` or `#`, and the user info at its last `@`: a password holding `@` or `:` is hidden whole,
/// and an `@` in the path or query is not mistaken for credentials.
fn redact_uri(url: &str, authority: usize) -> String {
    let rest = &url[authority..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..authority]);
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            out.push_str("***");
            out.push_str(&rest[at..authority_end]);
        }
        None => out.push_str(&rest[..authority_end]),
    }
    let tail = &rest[authority_end..];
    let Some(query) = tail.find('?') else {
        out.push_str(tail);
        return out;
    };
    out.push_str(&tail[..=query]);
    let tail = &tail[query + 1..];
    let (query, fragment) = match tail.find('#') {
        Some(hash) => tail.split_at(hash),
        None => (tail, ""),
    };
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) if is_secret_key(key) => {
                out.push_str(key);
                out.push_str("=***");
            }
            _ => out.push_str(pair),
        }
    }
    out.push_str(fragment);
    out
}

/// libpq's `key=value` form: spaces may surround `=`, a value is a word or a single-quoted
/// string where `\'` and `\\` are escapes. Everything but a secret value is copied as it was.
fn redact_conninfo(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &text[key_start..i];
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' {
            // Not `key=value` (stray word, or trailing spaces): copy it and go on.
            out.push_str(&text[key_start..i]);
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let value_start = i;
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'\'' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            // Past the closing quote; an unterminated one runs to the end, hidden as well.
            i = (i + 1).min(bytes.len());
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = i.min(bytes.len());
        }
        out.push_str(&text[key_start..value_start]);
        if is_secret_key(key) {
            out.push_str("***");
        } else {
            out.push_str(&text[value_start..i]);
        }
        let gap_start = i;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        out.push_str(&text[gap_start..i]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn hides(input: &str, expected: &str) {
        let out = redact_url(input);
        assert_eq!(out, expected, "redacting {input:?}");
    }

    #[test]
    fn userinfo_of_every_scheme_is_hidden() {
        hides(
            "postgres://app:s3cret@db:5432/orders",
            "postgres://***@db:5432/orders",
        );
        hides(
            "postgresql://app:s3cret@db/orders",
            "postgresql://***@db/orders",
        );
        hides(
            "amqp://guest:s3cret@127.0.0.1:5672/%2f",
            "amqp://***@127.0.0.1:5672/%2f",
        );
        hides(
            "amqps://guest:s3cret@rabbit.example:5671/prod",
            "amqps://***@rabbit.example:5671/prod",
        );
    }

    #[test]
    fn a_password_containing_at_or_colon_is_hidden_whole() {
        hides(
            "postgres://app:p@ss:w@rd@db/orders",
            "postgres://***@db/orders",
        );
        hides("amqp://u:a:b:c@rabbit/%2f", "amqp://***@rabbit/%2f");
    }

    #[test]
    fn an_at_sign_in_the_query_is_not_taken_for_credentials() {
        hides(
            "postgres://db/orders?application_name=billing@eu",
            "postgres://db/orders?application_name=billing@eu",
        );
        hides(
            "postgres://app:s3cret@db/orders?application_name=billing@eu",
            "postgres://***@db/orders?application_name=billing@eu",
        );
    }

    #[test]
    fn password_query_parameters_are_hidden() {
        hides(
            "postgres://db/orders?user=app&password=s3cret&sslmode=require",
            "postgres://db/orders?user=app&password=***&sslmode=require",
        );
        hides(
            "postgres://db/orders?sslpassword=s3cret",
            "postgres://db/orders?sslpassword=***",
        );
        hides(
            "amqps://rabbit/%2f?PASSWORD=s3cret#frag",
            "amqps://rabbit/%2f?PASSWORD=***#frag",
        );
    }

    #[test]
    fn conninfo_passwords_are_hidden_plain_or_quoted() {
        hides(
            "host=db password=s3cret user=app",
            "host=db password=*** user=app",
        );
        hides(
            "host=db password='a b s3cret' user=app",
            "host=db password=*** user=app",
        );
        hides(
            r"host=db password='it\'s s3cret' dbname=orders",
            "host=db password=*** dbname=orders",
        );
        hides("host=db password = s3cret", "host=db password = ***");
        hides(
            "host=db sslpassword=s3cret port=5432",
            "host=db sslpassword=*** port=5432",
        );
    }

    #[test]
    fn an_unterminated_quoted_password_hides_the_rest() {
        hides("host=db password='s3cret user=app", "host=db password=***");
    }

    #[test]
    fn text_without_a_password_is_unchanged() {
        for text in [
            "postgres://postgres@127.0.0.1:5432/oncely",
            "postgres://127.0.0.1/db",
            "amqp://rabbit:5672/%2f",
            "host=db user=app dbname=orders",
            "not a url",
            "",
        ] {
            let expected = if text == "postgres://postgres@127.0.0.1:5432/oncely" {
                // The user alone is hidden too: one rule for the whole userinfo.
                "postgres://***@127.0.0.1:5432/oncely"
            } else {
                text
            };
            hides(text, expected);
        }
    }
}
