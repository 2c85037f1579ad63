//! [`ToolFirewall`]: which tools a request may offer and a response may call.

/// Allow and deny lists of tool (function) names, with `*` wildcards.
///
/// A name is permitted when no deny pattern matches it and, if the allow list is not empty,
/// an allow pattern does. Names compare exactly (tool names are case-sensitive upstream).
/// Built-in tools (`web_search`, `code_interpreter`, `file_search`, `image_generation`,
/// `computer_use_preview`, `mcp`, ...) are named by their `type`; an MCP server's tools by
/// `mcp:<server_label>`.
///
/// ```
/// use tower_llm_policy::guard::ToolFirewall;
/// let fw = ToolFirewall::new()
///     .allow(["get_*", "search"])
///     .deny(["get_secret*"]);
/// assert!(fw.permits("get_weather"));
/// assert!(!fw.permits("get_secret_key"));
/// assert!(!fw.permits("delete_user"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolFirewall {
    allow: Vec<String>,
    deny: Vec<String>,
}

impl ToolFirewall {
    /// A firewall that permits every tool (add lists with [`allow`](Self::allow) and
    /// [`deny`](Self::deny)).
    pub fn new() -> Self {
        Self::default()
    }

    /// Permits only tools matching one of `patterns` (added to the allow list).
    #[must_use]
    pub fn allow<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allow.extend(patterns.into_iter().map(Into::into));
        self
    }

    /// Refuses tools matching one of `patterns`, whatever the allow list says.
    #[must_use]
    pub fn deny<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.deny.extend(patterns.into_iter().map(Into::into));
        self
    }

    /// Whether a tool named `name` may be offered or called.
    pub fn permits(&self, name: &str) -> bool {
        !self.deny.iter().any(|p| wildcard(p, name))
            && (self.allow.is_empty() || self.allow.iter().any(|p| wildcard(p, name)))
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (none too).
/// Linear in practice: the classic greedy matcher with one backtrack point.
pub(crate) fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_runs_anywhere() {
        assert!(wildcard("*", ""));
        assert!(wildcard("*", "anything"));
        assert!(wildcard("get_*", "get_"));
        assert!(wildcard("get_*", "get_weather"));
        assert!(!wildcard("get_*", "xget_weather"));
        assert!(wildcard("*_admin", "delete_admin"));
        assert!(!wildcard("*_admin", "delete_admins"));
        assert!(wildcard("a*b*c", "aXXbYYc"));
        assert!(!wildcard("a*b*c", "aXXbYY"));
        assert!(wildcard("exact", "exact"));
        assert!(!wildcard("exact", "Exact"));
        assert!(!wildcard("exact", "exactly"));
        assert!(!wildcard("", "x"));
        assert!(wildcard("mcp:*", "mcp:github"));
    }

    #[test]
    fn deny_wins_over_allow_and_empty_allow_permits_all() {
        let open = ToolFirewall::new().deny(["rm_*"]);
        assert!(open.permits("ls"));
        assert!(!open.permits("rm_rf"));
        let closed = ToolFirewall::new().allow(["ls"]).deny(["ls"]);
        assert!(!closed.permits("ls"));
        assert!(!closed.permits("cat"));
    }
}
