//! Who may do what where: an access policy by repository glob (longest match wins, `**` the
//! catch-all), with users, groups, any authenticated user and the anonymous user, plus the
//! admins and the tags that may not move. Read from TOML or JSON (by file extension;
//! unknown keys refused, so a typo cannot silently open or close a repository).

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;

use crate::glob::Glob;
use crate::AuthError;

/// What a request does to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// `*` is every action.
    pub fn parse_list(s: &str) -> Result<Vec<Action>, String> {
        match s {
            "*" => Ok(Action::ALL.to_vec()),
            "pull" => Ok(vec![Action::Pull]),
            "push" => Ok(vec![Action::Push]),
            "delete" => Ok(vec![Action::Delete]),
            other => Err(format!(
                "unknown action {other:?} (pull, push, delete or *)"
            )),
        }
    }
}

/// A set of actions: a byte, because a decision is made on every request and a set that
/// allocates would cost more than the rest of the decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    pub const ALL: Actions = Actions(0b111);

    pub fn contains(self, a: Action) -> bool {
        self.0 & a.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn is_subset(self, of: Actions) -> bool {
        self.0 & !of.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL.into_iter().filter(move |a| self.contains(*a))
    }
}

impl std::ops::BitOr for Actions {
    type Output = Actions;
    fn bitor(self, o: Actions) -> Actions {
        Actions(self.0 | o.0)
    }
}

impl std::ops::BitOrAssign for Actions {
    fn bitor_assign(&mut self, o: Actions) {
        self.0 |= o.0;
    }
}

impl FromIterator<Action> for Actions {
    fn from_iter<I: IntoIterator<Item = Action>>(it: I) -> Actions {
        Actions(it.into_iter().fold(0, |b, a| b | a.bit()))
    }
}

impl<const N: usize> From<[Action; N]> for Actions {
    fn from(a: [Action; N]) -> Actions {
        a.into_iter().collect()
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    admins: Vec<String>,
    #[serde(default)]
    groups: HashMap<String, Vec<String>>,
    #[serde(default)]
    repositories: Vec<RawRule>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawRule {
    pattern: String,
    #[serde(default)]
    users: HashMap<String, Vec<String>>,
    #[serde(default)]
    groups: HashMap<String, Vec<String>>,
    /// Any authenticated user.
    #[serde(default)]
    authenticated: Vec<String>,
    #[serde(default)]
    anonymous: Vec<String>,
    /// Tag globs a push may create but never move to another digest.
    #[serde(default)]
    immutable_tags: Vec<String>,
}

#[derive(Debug, Clone)]
struct Rule {
    glob: Glob,
    users: HashMap<String, Actions>,
    groups: HashMap<String, Actions>,
    authenticated: Actions,
    anonymous: Actions,
    immutable: Vec<Glob>,
}

/// A validated access policy.
#[derive(Debug, Clone)]
pub struct Policy {
    admins: BTreeSet<String>,
    /// user → the groups naming it.
    member_of: HashMap<String, Vec<String>>,
    /// Most specific first.
    rules: Vec<Rule>,
}

fn actions(list: &[String], at: &str) -> Result<Actions, AuthError> {
    let mut out = Actions::NONE;
    for a in list {
        out |= Action::parse_list(a)
            .map_err(|m| AuthError::Policy(format!("{at}: {m}")))?
            .into_iter()
            .collect();
    }
    Ok(out)
}

impl Policy {
    /// The policy without `--access`: any authenticated user pulls and pushes everywhere;
    /// deletes and the admin API are for the admins; anonymous gets nothing.
    pub fn default_for(admins: &[String]) -> Policy {
        Policy {
            admins: admins.iter().cloned().collect(),
            member_of: HashMap::new(),
            rules: vec![Rule {
                glob: Glob::new("**").expect("valid"),
                users: HashMap::new(),
                groups: HashMap::new(),
                authenticated: [Action::Pull, Action::Push].into(),
                anonymous: Actions::NONE,
                immutable: vec![],
            }],
        }
    }

    /// `json` picks the syntax; `extra_admins` (the `--admin` flag) join the file's.
    pub fn parse(text: &str, json: bool, extra_admins: &[String]) -> Result<Policy, AuthError> {
        let raw: RawPolicy = if json {
            serde_json::from_str(text).map_err(|e| AuthError::Policy(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| AuthError::Policy(e.to_string()))?
        };
        let mut member_of: HashMap<String, Vec<String>> = HashMap::new();
        for (group, users) in &raw.groups {
            for u in users {
                member_of.entry(u.clone()).or_default().push(group.clone());
            }
        }
        let mut rules = Vec::new();
        for r in &raw.repositories {
            let at = format!("repositories pattern {:?}", r.pattern);
            let glob =
                Glob::new(&r.pattern).map_err(|m| AuthError::Policy(format!("{at}: {m}")))?;
            for g in r.groups.keys() {
                if !raw.groups.contains_key(g) {
                    return Err(AuthError::Policy(format!(
                        "{at}: group {g:?} is not defined under [groups]"
                    )));
                }
            }
            let mut users = HashMap::new();
            for (u, a) in &r.users {
                users.insert(u.clone(), actions(a, &at)?);
            }
            let mut groups = HashMap::new();
            for (g, a) in &r.groups {
                groups.insert(g.clone(), actions(a, &at)?);
            }
            let immutable = r
                .immutable_tags
                .iter()
                .map(|t| Glob::new(t).map_err(|m| AuthError::Policy(format!("{at}: {m}"))))
                .collect::<Result<_, _>>()?;
            rules.push(Rule {
                glob,
                users,
                groups,
                authenticated: actions(&r.authenticated, &at)?,
                anonymous: actions(&r.anonymous, &at)?,
                immutable,
            });
        }
        if rules
            .iter()
            .map(|r| r.glob.as_str())
            .collect::<BTreeSet<_>>()
            .len()
            != rules.len()
        {
            return Err(AuthError::Policy("two rules have the same pattern".into()));
        }
        // Stable: equally specific patterns keep file order.
        rules.sort_by_key(|r| std::cmp::Reverse(r.glob.specificity()));
        let mut admins: BTreeSet<String> = raw.admins.into_iter().collect();
        admins.extend(extra_admins.iter().cloned());
        Ok(Policy {
            admins,
            member_of,
            rules,
        })
    }

    fn rule(&self, repo: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.glob.matches(repo))
    }

    pub fn is_admin(&self, user: &str) -> bool {
        self.admins.contains(user)
    }

    /// What `user` (`None`: anonymous) may do to `repo`. Admins may do everything.
    pub fn allowed(&self, user: Option<&str>, repo: &str) -> Actions {
        let Some(user) = user else {
            return self.rule(repo).map(|r| r.anonymous).unwrap_or_default();
        };
        if self.is_admin(user) {
            return Actions::ALL;
        }
        let Some(rule) = self.rule(repo) else {
            return Actions::NONE;
        };
        let mut out = rule.authenticated | rule.anonymous;
        if let Some(a) = rule.users.get(user) {
            out |= *a;
        }
        for g in self.member_of.get(user).into_iter().flatten() {
            if let Some(a) = rule.groups.get(g) {
                out |= *a;
            }
        }
        out
    }

    pub fn allows(&self, user: Option<&str>, repo: &str, action: Action) -> bool {
        self.allowed(user, repo).contains(action)
    }

    /// Whether anonymous requests may do anything anywhere (then an unauthenticated request
    /// is not refused before its repository is known).
    pub fn anonymous_anywhere(&self) -> bool {
        self.rules.iter().any(|r| !r.anonymous.is_empty())
    }

    /// Whether `tag` of `repo` may not move once it exists.
    pub fn immutable(&self, repo: &str, tag: &str) -> bool {
        self.rule(repo)
            .is_some_and(|r| r.immutable.iter().any(|g| g.matches(tag)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
admins = ["root"]
[groups]
ci = ["builder"]

[[repositories]]
pattern = "**"
authenticated = ["pull"]

[[repositories]]
pattern = "public/**"
anonymous = ["pull"]
groups = { ci = ["push"] }

[[repositories]]
pattern = "billing/**"
users = { bob = ["pull", "push"] }
immutable_tags = ["v*"]

[[repositories]]
pattern = "billing/secret/**"
users = { carol = ["*"] }
"#;

    #[test]
    fn longest_match_wins_and_groups_and_anonymous_apply() {
        let p = Policy::parse(TOML, false, &["ops".into()]).unwrap();
        use Action::*;
        assert!(p.allows(None, "public/x/y", Pull));
        assert!(!p.allows(None, "public/x/y", Push));
        assert!(!p.allows(None, "other/x", Pull));
        assert!(p.allows(Some("builder"), "public/x/y", Push));
        assert!(
            p.allows(Some("builder"), "public/x/y", Pull),
            "anonymous rights extend to users"
        );
        assert!(!p.allows(Some("builder"), "billing/api", Push));
        assert!(p.allows(Some("bob"), "billing/api", Push));
        // billing/secret/** is more specific than billing/**: bob's rights do not reach it.
        assert!(!p.allows(Some("bob"), "billing/secret/x", Pull));
        assert!(p.allows(Some("carol"), "billing/secret/x", Delete));
        assert!(p.allows(Some("anyone"), "misc/x", Pull));
        assert!(!p.allows(Some("anyone"), "misc/x", Push));
        assert!(p.allows(Some("root"), "billing/secret/x", Delete));
        assert!(p.is_admin("ops") && p.is_admin("root") && !p.is_admin("bob"));
        assert!(p.immutable("billing/api", "v1.0"));
        assert!(!p.immutable("billing/api", "latest"));
        assert!(
            !p.immutable("billing/secret/x", "v1"),
            "the most specific rule decides"
        );
        assert!(p.anonymous_anywhere());
    }

    #[test]
    fn json_is_the_same_policy_and_mistakes_are_named() {
        let json = r#"{"repositories":[{"pattern":"a/**","users":{"u":["pull"]}}]}"#;
        let p = Policy::parse(json, true, &[]).unwrap();
        assert!(p.allows(Some("u"), "a/b", Action::Pull));
        assert!(
            !p.allows(Some("u"), "b/c", Action::Pull),
            "no rule, no access"
        );
        let e = Policy::parse(r#"{"repos":[]}"#, true, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("repos"), "{e}");
        let e = Policy::parse(
            r#"{"repositories":[{"pattern":"a/**","users":{"u":["pul"]}}]}"#,
            true,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pul") && e.contains("a/**"), "{e}");
        let e = Policy::parse(
            r#"{"repositories":[{"pattern":"a/**","groups":{"nope":["pull"]}}]}"#,
            true,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn the_default_policy_lets_users_pull_and_push_and_admins_delete() {
        let p = Policy::default_for(&["admin".into()]);
        assert!(p.allows(Some("u"), "x/y", Action::Push));
        assert!(!p.allows(Some("u"), "x/y", Action::Delete));
        assert!(p.allows(Some("admin"), "x/y", Action::Delete));
        assert!(!p.allows(None, "x/y", Action::Pull));
        assert!(!p.anonymous_anywhere());
    }
}
