//! Finds the line of a key path (`routes[2].credential`) in the TOML source, for error messages.

use toml_edit::{DocumentMut, ImDocument, Item, Table, TableLike, Value};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A key path such as `providers.payu.token_url` or `routes[2].credential`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub(super) Vec<Segment>);

impl KeyPath {
    pub fn root() -> Self {
        Self::default()
    }

    pub fn key(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    pub fn ends_with_key(&self, key: &str) -> bool {
        matches!(self.0.last(), Some(Segment::Key(last)) if last == key)
    }

    pub fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// The TOML source parsed with spans, to answer "which line is this key on?". It is parsed on
/// the first question: a config without problems never pays for it.
pub struct SourceMap {
    source: String,
    document: std::cell::OnceCell<Option<ImDocument<String>>>,
    line_starts: Vec<usize>,
}

impl SourceMap {
    pub fn new(source: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            source: source.to_owned(),
            document: std::cell::OnceCell::new(),
            line_starts,
        }
    }

    fn document(&self) -> Option<&ImDocument<String>> {
        self.document
            .get_or_init(|| ImDocument::parse(self.source.clone()).ok())
            .as_ref()
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset).max(1)
    }

    /// The line of the deepest part of `path` present in the file (the key's own line when the
    /// key exists, else its table's), or `None` when not even the first segment exists.
    pub fn line_of_path(&self, path: &KeyPath) -> Option<usize> {
        let document = self.document()?;
        let mut found = None;
        let mut node = Node::Table(document.as_table());
        for segment in &path.0 {
            let Some((next, span)) = node.child(segment) else {
                break;
            };
            if let Some(span) = span {
                found = Some(span.start);
            }
            node = next;
        }
        found.map(|offset| self.line_of(offset))
    }
}

/// `source` without the key at `path` (or, for a path into an array, without that whole
/// array); `None` when the source does not parse or has no such key.
pub fn remove_path(source: &str, path: &KeyPath) -> Option<String> {
    let mut document: DocumentMut = source.parse().ok()?;
    let last_key = path.0.iter().rposition(|s| matches!(s, Segment::Key(_)))?;
    let Segment::Key(key) = &path.0[last_key] else {
        return None;
    };
    let parent = table_at(document.as_table_mut(), &path.0[..last_key])?;
    parent.remove(key)?;
    Some(document.to_string())
}

fn table_at<'a>(table: &'a mut dyn TableLike, path: &[Segment]) -> Option<&'a mut dyn TableLike> {
    let Some((first, rest)) = path.split_first() else {
        return Some(table);
    };
    let Segment::Key(key) = first else { return None };
    let item = table.get_mut(key)?;
    match (item, rest.first()) {
        (Item::ArrayOfTables(array), Some(Segment::Index(index))) => {
            table_at(array.get_mut(*index)?, &rest[1..])
        }
        (Item::Value(Value::Array(array)), Some(Segment::Index(index))) => match array.get_mut(*index)? {
            Value::InlineTable(inline) => table_at(inline, &rest[1..]),
            _ => None,
        },
        (Item::Table(inner), _) => table_at(inner, rest),
        (Item::Value(Value::InlineTable(inline)), _) => table_at(inline, rest),
        _ => None,
    }
}

enum Node<'a> {
    Table(&'a Table),
    Item(&'a Item),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn child(&self, segment: &Segment) -> Option<(Node<'a>, Option<std::ops::Range<usize>>)> {
        match (self, segment) {
            (Node::Table(table), Segment::Key(key)) => {
                let (key, item) = table.get_key_value(key)?;
                Some((Node::Item(item), key.span().or_else(|| item.span())))
            }
            (Node::Item(Item::Table(table)), Segment::Key(_)) => Node::Table(table).child(segment),
            (Node::Item(Item::Value(value)), _) => Node::Value(value).child(segment),
            (Node::Item(Item::ArrayOfTables(array)), Segment::Index(index)) => {
                let table = array.get(*index)?;
                Some((Node::Table(table), table.span()))
            }
            (Node::Value(Value::InlineTable(table)), Segment::Key(key)) => {
                let (key, item) = table.get_key_value(key)?;
                Some((Node::Item(item), key.span().or_else(|| item.span())))
            }
            (Node::Value(Value::Array(array)), Segment::Index(index)) => {
                let value = array.get(*index)?;
                Some((Node::Value(value), value.span()))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"[server]
listen = "127.0.0.1:8080"

[providers.payu]
token_url = "https://x/oauth/token"

[[routes]]
path_prefix = "/a"
credential = "a"

[[routes]]
path_prefix = "/b"
credential = "missing"
inject = { header = "X-Auth", format = "T" }
"#;

    #[test]
    fn finds_keys_in_tables_arrays_of_tables_and_inline_tables() {
        let map = SourceMap::new(SOURCE);
        let root = KeyPath::root();
        assert_eq!(map.line_of_path(&root.key("server").key("listen")), Some(2));
        assert_eq!(
            map.line_of_path(&root.key("providers").key("payu").key("token_url")),
            Some(5)
        );
        assert_eq!(
            map.line_of_path(&root.key("routes").index(1).key("credential")),
            Some(13)
        );
        assert_eq!(
            map.line_of_path(&root.key("routes").index(1).key("inject").key("format")),
            Some(14)
        );
    }

    #[test]
    fn a_missing_key_reports_its_table() {
        let map = SourceMap::new(SOURCE);
        let path = KeyPath::root().key("routes").index(0).key("upstream");
        assert_eq!(map.line_of_path(&path), Some(7));
        assert_eq!(path.to_string(), "routes[0].upstream");
    }
}
