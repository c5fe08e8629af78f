//! CRD descriptions as prose: the `///` comments they come from are wrapped at 100 columns, and
//! `kubectl explain` re-wraps text itself, so a comment's line breaks would cut its sentences.

use serde_json::Value;

/// Joins the lines of each paragraph of `text` with a space. A blank line (a paragraph break)
/// stays, as one blank line; a list item (`- `, `* `, `1. `) keeps its own line.
pub fn unwrap_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut paragraph_open = false;
    let mut blank_seen = false;
    for line in text.lines().map(str::trim_end) {
        if line.is_empty() {
            blank_seen = paragraph_open;
            continue;
        }
        if blank_seen {
            out.push_str("\n\n");
            out.push_str(line);
        } else if !paragraph_open {
            out.push_str(line);
        } else if is_list_item(line) {
            out.push('\n');
            out.push_str(line);
        } else {
            out.push(' ');
            out.push_str(line.trim_start());
        }
        paragraph_open = true;
        blank_seen = false;
    }
    out
}

/// True when `line` starts a Markdown list item.
pub fn is_list_item(line: &str) -> bool {
    let line = line.trim_start();
    if line.starts_with("- ") || line.starts_with("* ") {
        return true;
    }
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && line[digits..].starts_with(". ")
}

/// Applies [`unwrap_lines`] to every `description` string in `schema`, at any depth. A property
/// that happens to be named `description` is an object, not a string, and is only descended into.
pub fn unwrap_descriptions(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(text) if key == "description" => *text = unwrap_lines(text),
                    other => unwrap_descriptions(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_of_a_paragraph_join_with_a_space() {
        let wasm = "A WebAssembly (WASI preview 1) command module: sandboxed, portable, deterministic. The\nrecommended runtime for untrusted providers.";
        assert_eq!(
            unwrap_lines(wasm),
            "A WebAssembly (WASI preview 1) command module: sandboxed, portable, deterministic. The recommended runtime for untrusted providers."
        );
        assert_eq!(unwrap_lines("one line"), "one line");
        assert_eq!(unwrap_lines(""), "");
        assert_eq!(unwrap_lines("trailing space \n  and indent"), "trailing space and indent");
    }

    #[test]
    fn a_blank_line_stays_a_paragraph_break() {
        assert_eq!(unwrap_lines("First\nparagraph.\n\nSecond\nparagraph."), "First paragraph.\n\nSecond paragraph.");
        // Several blank lines, or ones holding spaces, are one break; none is kept at the ends.
        assert_eq!(unwrap_lines("\nFirst.\n\n \n\nSecond.\n\n"), "First.\n\nSecond.");
    }

    #[test]
    fn list_items_keep_their_own_lines() {
        let text = "Phases:\n- Pending: waiting\n  for room\n- Running\n* Done\n1. first\n12. twelfth\nafter the list";
        assert_eq!(unwrap_lines(text), "Phases:\n- Pending: waiting for room\n- Running\n* Done\n1. first\n12. twelfth after the list");
        // Not list items: a hyphen or number inside a sentence wrapped to the start of a line.
        assert!(!is_list_item("-1 is not"));
        assert!(!is_list_item("2.5 cores"));
        assert!(!is_list_item("v1. x"));
    }

    #[test]
    fn every_description_string_is_unwrapped_at_any_depth() {
        let mut schema = json!({
            "description": "top\nlevel",
            "properties": {
                "description": { "type": "string", "description": "a field\nnamed description" },
                "items": { "items": { "description": "in an\narray schema" }, "anyOf": [{ "description": "one\nof" }] },
                "example": { "value": "not a\ndescription" },
            },
        });
        unwrap_descriptions(&mut schema);
        assert_eq!(
            schema,
            json!({
                "description": "top level",
                "properties": {
                    "description": { "type": "string", "description": "a field named description" },
                    "items": { "items": { "description": "in an array schema" }, "anyOf": [{ "description": "one of" }] },
                    "example": { "value": "not a\ndescription" },
                },
            })
        );
    }
}
