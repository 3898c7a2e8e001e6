//! `web_fetch`: GET a URL and return readable text, without letting a model reach what
//! only the host can: the host is resolved, every address checked (loopback, private,
//! link-local and cloud metadata, CGNAT, multicast, reserved, in IPv4 and IPv6 forms,
//! IPv4 embedded in IPv6), and the connection goes to the address that was checked, so
//! a DNS answer that changes in between (rebinding) cannot switch it. Redirects are
//! followed by hand, each one checked the same way; redirects, body size and time are
//! capped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use clawbus_config::SandboxConfig;
use serde::Deserialize;

use crate::ToolError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchArgs {
    url: String,
    #[serde(default, rename = "maxChars")]
    max_chars: Option<usize>,
}

/// Why an address may not be fetched, if it may not.
pub fn blocked(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_private() => "a private address",
        _ if ip.is_link_local() => "a link-local address (cloud metadata lives there)",
        _ if a == 100 && (64..128).contains(&b) => "a carrier-grade NAT address",
        _ if ip.is_multicast() => "a multicast address",
        _ if ip.is_broadcast() => "the broadcast address",
        _ if a == 0 => "a 'this network' address",
        _ if a >= 240 => "a reserved address",
        _ if a == 192 && b == 0 && c == 0 => "an IETF protocol address",
        _ if a == 198 && (b == 18 || b == 19) => "a benchmarking address",
        _ if ip.is_documentation() => "a documentation address",
        _ => return None,
    })
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // IPv4 inside IPv6: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d), NAT64
    // (64:ff9b::a.b.c.d), 6to4 (2002:AABB:CCDD::).
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return blocked_v4(v4).or(Some("an IPv4-mapped address"));
    }
    if s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified() {
        return blocked_v4(embedded(s[6], s[7])).or(Some("an IPv4-compatible address"));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return blocked_v4(embedded(s[6], s[7])).or(None);
    }
    if s[0] == 0x2002 {
        if let Some(r) = blocked_v4(embedded(s[1], s[2])) {
            return Some(r);
        }
    }
    Some(match () {
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_unspecified() => "the unspecified address",
        _ if ip.is_multicast() => "a multicast address",
        _ if (s[0] & 0xfe00) == 0xfc00 => "a unique local address (cloud metadata lives there)",
        _ if (s[0] & 0xffc0) == 0xfe80 => "a link-local address",
        _ if (s[0] & 0xffc0) == 0xfec0 => "a site-local address",
        _ if s[0] == 0x2001 && s[1] == 0x0db8 => "a documentation address",
        _ if s[0] == 0x2001 && s[1] == 0 => "a Teredo address",
        _ => return None,
    })
}

/// The addresses `host` may be fetched at, or why not. A host on
/// `sandbox.web_allow_hosts` skips the address checks.
async fn addresses(cfg: &SandboxConfig, url: &reqwest::Url) -> Result<Vec<SocketAddr>, ToolError> {
    let port = url.port_or_known_default().unwrap_or(80);
    let host = url
        .host()
        .ok_or_else(|| ToolError::bad("the URL has no host"))?;
    let name = host.to_string();
    let allowed = cfg
        .web_allow_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(&name));
    let addrs: Vec<SocketAddr> = match host {
        url::Host::Ipv4(ip) => vec![SocketAddr::new(ip.into(), port)],
        url::Host::Ipv6(ip) => vec![SocketAddr::new(ip.into(), port)],
        url::Host::Domain(d) => {
            tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((d, port)))
                .await
                .map_err(|_| ToolError::unavailable(format!("resolving {d} took too long")))?
                .map_err(|e| ToolError::unavailable(format!("cannot resolve {d}: {e}")))?
                .collect()
        }
    };
    if addrs.is_empty() {
        return Err(ToolError::unavailable(format!("{name} has no address")));
    }
    if !allowed {
        // Every answer must be public: one private address is enough to refuse.
        for a in &addrs {
            if let Some(why) = blocked(a.ip()) {
                return Err(ToolError::denied(format!(
                    "{name} resolves to {}, {why}: web_fetch reaches public addresses only",
                    a.ip()
                )));
            }
        }
    }
    Ok(addrs)
}

pub async fn fetch(cfg: &SandboxConfig, a: FetchArgs) -> Result<String, ToolError> {
    let mut url = reqwest::Url::parse(a.url.trim())
        .map_err(|e| ToolError::bad(format!("`{}` is not a URL: {e}", a.url)))?;
    let max_chars = a
        .max_chars
        .unwrap_or(cfg.web_fetch_max_chars)
        .min(cfg.web_fetch_max_chars);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.web_fetch_timeout_secs);
    for _ in 0..=cfg.web_fetch_max_redirects {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ToolError::denied(format!(
                "only http and https URLs are fetched, not `{}`",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ToolError::denied("URLs with credentials are not fetched"));
        }
        let addrs = addresses(cfg, &url).await?;
        // Connect to the address that was checked, whatever DNS says next.
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("clawbus-web-fetch/", env!("CARGO_PKG_VERSION")));
        if let Some(url::Host::Domain(d)) = url.host() {
            client = client.resolve(d, addrs[0]);
        }
        let client = client
            .build()
            .map_err(|e| ToolError::internal(e.to_string()))?;
        let resp = tokio::time::timeout_at(deadline, client.get(url.clone()).send())
            .await
            .map_err(|_| ToolError::unavailable("the fetch took too long"))?
            .map_err(|e| ToolError::unavailable(format!("fetch failed: {e}")))?;
        let status = resp.status();
        if status.is_redirection() {
            let next = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    ToolError::unavailable(format!("HTTP {status} without a Location"))
                })?;
            url = url
                .join(next)
                .map_err(|e| ToolError::bad(format!("bad redirect `{next}`: {e}")))?;
            continue;
        }
        let kind = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let textual = kind.is_empty()
            || kind.starts_with("text/")
            || kind.contains("json")
            || kind.contains("xml")
            || kind.contains("javascript");
        if !textual {
            return Err(ToolError::bad(format!(
                "{url} is `{kind}`, not text; web_fetch returns readable text only"
            )));
        }
        let (body, cut) =
            tokio::time::timeout_at(deadline, read_capped(resp, cfg.web_fetch_max_bytes))
                .await
                .map_err(|_| ToolError::unavailable("the fetch took too long"))??;
        let raw = String::from_utf8_lossy(&body);
        let mut text = if kind.contains("html") || (kind.is_empty() && raw.contains("<html")) {
            html2text::from_read(raw.as_bytes(), 100).unwrap_or_else(|_| raw.clone().into_owned())
        } else {
            raw.into_owned()
        };
        let total = text.chars().count();
        if total > max_chars {
            text = text.chars().take(max_chars).collect();
            text.push_str(&format!("\n[cut: {max_chars} of {total} characters]"));
        } else if cut {
            text.push_str(&format!(
                "\n[cut: the page is over {} bytes]",
                cfg.web_fetch_max_bytes
            ));
        }
        return Ok(format!("URL: {url}\nStatus: {}\n\n{text}", status.as_u16()));
    }
    Err(ToolError::unavailable(format!(
        "more than {} redirects",
        cfg.web_fetch_max_redirects
    )))
}

/// The body, at most `max` bytes (and whether there was more).
async fn read_capped(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<(Vec<u8>, bool), ToolError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ToolError::unavailable(format!("fetch failed: {e}")))?
    {
        let room = max.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() > room {
            return Ok((body, true));
        }
    }
    Ok((body, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_addresses_are_blocked_in_every_form() {
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::",
            "2001:db8::1",
            "2001::1",
        ] {
            assert!(blocked(ip(bad)).is_some(), "{bad} should be blocked");
        }
        for good in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "64:ff9b::5db8:d822",
        ] {
            assert_eq!(blocked(ip(good)), None, "{good}");
        }
    }

    #[test]
    fn numeric_host_forms_are_the_addresses_they_mean() {
        // The WHATWG parser reads decimal, octal and hex IPv4 forms as the address.
        for (u, expect) in [
            ("http://2130706433/", "127.0.0.1"),
            ("http://0x7f.0.0.1/", "127.0.0.1"),
            ("http://0177.0.0.01/", "127.0.0.1"),
            ("http://0xa9fea9fe/", "169.254.169.254"),
            ("http://[::ffff:7f00:1]/", "::ffff:127.0.0.1"),
        ] {
            let url = reqwest::Url::parse(u).unwrap();
            let host = match url.host().unwrap() {
                url::Host::Ipv4(v) => IpAddr::V4(v),
                url::Host::Ipv6(v) => IpAddr::V6(v),
                url::Host::Domain(d) => panic!("{u} read as a domain {d}"),
            };
            assert_eq!(host, ip(expect), "{u}");
            assert!(blocked(host).is_some(), "{u}");
        }
    }
}
