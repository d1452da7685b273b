//! Reading an export back: NDJSON lines grouped into the sends they came
//! from. The whole input is checked before anything is sent.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io::BufRead;

use async_messages::{Level, MessageStore, UserId};
use serde_json::{Map, Value};

use crate::Failure;

/// The fields an export line has.
const FIELDS: [&str; 7] = [
    "id",
    "user",
    "level",
    "text",
    "sent_at_ms",
    "expires_at_ms",
    "replace_key",
];

/// One send of the original store, to every user whose line carried its id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Send {
    pub(crate) id: u64,
    pub(crate) level: Level,
    pub(crate) text: String,
    /// Milliseconds since the Unix epoch; `None`: kept until delivered.
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) replace_key: Option<String>,
    /// In the order of their lines.
    pub(crate) users: Vec<UserId>,
    /// The first line that named this send (1-based), for messages.
    pub(crate) line: usize,
}

/// Reads every line of `input` and returns the sends, in original id
/// order (so that each user's messages keep their order), with their
/// total number of lines.
pub(crate) fn read(input: impl BufRead) -> Result<(Vec<Send>, u64), Failure> {
    let mut sends: Vec<Send> = Vec::new();
    let mut by_id: HashMap<u64, usize> = HashMap::new();
    // Each user's last id and its line: ids must grow down each user's lines.
    let mut last: HashMap<UserId, (u64, usize)> = HashMap::new();
    let mut lines = 0_u64;
    for (index, line) in input.split(b'\n').enumerate() {
        let number = index + 1;
        let line = line.map_err(|e| format!("cannot read line {number} of stdin: {e}"))?;
        let line = std::str::from_utf8(&line)
            .map_err(|_| format!("line {number} is not UTF-8 text"))?
            .trim();
        if line.is_empty() {
            continue;
        }
        lines += 1;
        let Line {
            id,
            user,
            level,
            text,
            expires_at_ms,
            replace_key,
        } = parse_line(line, number)?;
        match last.entry(user.clone()) {
            Entry::Occupied(mut seen) => {
                let (before, before_line) = *seen.get();
                if id <= before {
                    return Err(format!(
                        "line {number}: user {user}'s message has id {id}, not above the id {before} of line {before_line}; an export lists each user's messages once each, in send order"
                    )
                    .into());
                }
                seen.insert((id, number));
            }
            Entry::Vacant(first) => {
                first.insert((id, number));
            }
        }
        match by_id.entry(id) {
            Entry::Occupied(known) => {
                let send = sends
                    .get_mut(*known.get())
                    .ok_or_else(|| "internal: a send went missing".to_owned())?;
                let differs = if send.text != text {
                    Some("text")
                } else if send.level != level {
                    Some("level")
                } else if send.expires_at_ms != expires_at_ms {
                    Some("expiry")
                } else if send.replace_key != replace_key {
                    Some("replace key")
                } else {
                    None
                };
                if let Some(field) = differs {
                    return Err(format!(
                        "line {number} has id {id}, as line {}, but another {field}; the lines of one send carry the same text, level, expiry and replace key",
                        send.line,
                    )
                    .into());
                }
                send.users.push(user);
            }
            Entry::Vacant(new) => {
                new.insert(sends.len());
                sends.push(Send {
                    id,
                    level,
                    text,
                    expires_at_ms,
                    replace_key,
                    users: vec![user],
                    line: number,
                });
            }
        }
    }
    sends.sort_unstable_by_key(|send| send.id);
    Ok((sends, lines))
}

/// One export line.
struct Line {
    id: u64,
    user: UserId,
    level: Level,
    text: String,
    expires_at_ms: Option<u64>,
    replace_key: Option<String>,
}

fn parse_line(line: &str, number: usize) -> Result<Line, Failure> {
    let bad =
        |what: &str| -> Failure { format!("line {number} {what}; nothing was imported").into() };
    let object: Map<String, Value> = match serde_json::from_str(line) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err(bad("is not a JSON object")),
        Err(e) => return Err(bad(&format!("is not valid JSON ({e})"))),
    };
    for name in object.keys() {
        if !FIELDS.contains(&name.as_str()) {
            return Err(bad(&format!(
                "has the field {name:?}, which this version does not know (an export line has {})",
                FIELDS.join(", ")
            )));
        }
    }
    let id = object
        .get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("has no \"id\" that is a whole number"))?;
    let user = match object.get("user") {
        Some(Value::Number(n)) => UserId::Int(
            n.as_u64()
                .ok_or_else(|| bad("has a \"user\" number that is not a whole number ≥ 0"))?,
        ),
        Some(Value::String(name)) if name.len() <= UserId::MAX_STR_BYTES => {
            UserId::Str(name.clone())
        }
        Some(Value::String(name)) => {
            return Err(bad(&format!(
                "has a user id of {} bytes, over the limit of {} bytes",
                name.len(),
                UserId::MAX_STR_BYTES
            )));
        }
        _ => return Err(bad("has no \"user\" that is a number or a string")),
    };
    let level = match object.get("level") {
        Some(Value::String(name)) => name.parse::<Level>().ok(),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .and_then(Level::from_value),
        _ => None,
    }
    .ok_or_else(|| {
        bad("has no \"level\" that is debug, info, success, warning or error (or 10, 20, 25, 30, 40)")
    })?;
    let text = match object.get("text") {
        Some(Value::String(text)) if text.is_empty() => return Err(bad("has an empty text")),
        Some(Value::String(text)) if text.len() > MessageStore::DEFAULT_MAX_MESSAGE_BYTES => {
            return Err(bad(&format!(
                "has a text of {} bytes, over the limit of {} bytes",
                text.len(),
                MessageStore::DEFAULT_MAX_MESSAGE_BYTES
            )));
        }
        Some(Value::String(text)) => text.clone(),
        _ => return Err(bad("has no \"text\" that is a string")),
    };
    if let Some(sent) = object.get("sent_at_ms")
        && sent.as_u64().is_none()
    {
        return Err(bad("has a \"sent_at_ms\" that is not a whole number ≥ 0"));
    }
    let expires_at_ms = match object.get("expires_at_ms") {
        None | Some(Value::Null) => None,
        Some(at) => {
            let at = at.as_u64().ok_or_else(|| {
                bad("has an \"expires_at_ms\" that is neither null nor a whole number ≥ 0")
            })?;
            let latest = now_ms().saturating_add(
                u64::try_from(MessageStore::MAX_EXPIRY.as_millis()).unwrap_or(u64::MAX),
            );
            if at > latest {
                return Err(bad(&format!(
                    "has an \"expires_at_ms\" of {at}, more than {} days from now, the longest expiry a store keeps",
                    MessageStore::MAX_EXPIRY.as_secs() / 86_400
                )));
            }
            Some(at)
        }
    };
    let replace_key = match object.get("replace_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) if key.is_empty() => {
            return Err(bad("has an empty \"replace_key\""));
        }
        Some(Value::String(key)) if key.len() > MessageStore::MAX_REPLACE_KEY_BYTES => {
            return Err(bad(&format!(
                "has a replace key of {} bytes, over the limit of {} bytes",
                key.len(),
                MessageStore::MAX_REPLACE_KEY_BYTES
            )));
        }
        Some(Value::String(key)) => Some(key.clone()),
        Some(_) => {
            return Err(bad(
                "has a \"replace_key\" that is neither null nor a string",
            ));
        }
    };
    Ok(Line {
        id,
        user,
        level,
        text,
        expires_at_ms,
        replace_key,
    })
}

/// This machine's clock, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(input: &str) -> Result<Vec<Send>, String> {
        read(input.as_bytes())
            .map(|(sends, _)| sends)
            .map_err(|e| match e {
                Failure::Said(s) => s,
                Failure::Quiet => String::new(),
            })
    }

    #[test]
    fn lines_of_one_send_become_one_send_in_id_order() -> Result<(), String> {
        let sends = read_str(
            r#"{"id":5,"user":1,"level":"info","text":"b","sent_at_ms":1}
{"id":9,"user":1,"level":30,"text":"c"}

{"id":2,"user":"al","level":"error","text":"a","sent_at_ms":1}
{"id":5,"user":"al","level":"info","text":"b","sent_at_ms":1,"expires_at_ms":null}
{"id":11,"user":1,"level":"info","text":"d","expires_at_ms":7,"replace_key":"k"}
"#,
        )?;
        let ids: Vec<u64> = sends.iter().map(|s| s.id).collect();
        assert_eq!(ids, [2, 5, 9, 11]);
        assert_eq!(sends[1].users, [UserId::Int(1), UserId::from("al")]);
        assert_eq!(sends[1].expires_at_ms, None);
        assert_eq!(sends[2].level, Level::Warning);
        assert_eq!(sends[3].expires_at_ms, Some(7));
        assert_eq!(sends[3].replace_key.as_deref(), Some("k"));
        Ok(())
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        for (input, expected) in [
            ("[1]", "line 1 is not a JSON object"),
            ("{", "line 1 is not valid JSON"),
            (
                r#"{"id":1,"user":1,"level":"loud","text":"a"}"#,
                "\"level\"",
            ),
            (
                r#"{"id":1,"user":-1,"level":"info","text":"a"}"#,
                "\"user\"",
            ),
            (
                r#"{"id":1,"user":1,"level":"info","text":""}"#,
                "empty text",
            ),
            (
                r#"{"id":1,"user":1,"level":"info","text":"a","x":1}"#,
                "\"x\"",
            ),
            (
                r#"{"id":1,"user":1,"level":"info","text":"a","expires_at_ms":-9}"#,
                "\"expires_at_ms\"",
            ),
            (
                r#"{"id":1,"user":1,"level":"info","text":"a","expires_at_ms":99999999999999999}"#,
                "3650 days",
            ),
            (
                r#"{"id":1,"user":1,"level":"info","text":"a","replace_key":""}"#,
                "empty \"replace_key\"",
            ),
            (
                r#"{"id":1,"user":1,"level":"info","text":"a","replace_key":7}"#,
                "\"replace_key\"",
            ),
            (
                "{\"id\":2,\"user\":1,\"level\":\"info\",\"text\":\"a\"}\n{\"id\":2,\"user\":3,\"level\":\"info\",\"text\":\"a\",\"replace_key\":\"k\"}",
                "another replace key",
            ),
            (
                "{\"id\":2,\"user\":1,\"level\":\"info\",\"text\":\"a\"}\n{\"id\":1,\"user\":1,\"level\":\"info\",\"text\":\"b\"}",
                "line 2: user 1's message has id 1",
            ),
            (
                "{\"id\":2,\"user\":1,\"level\":\"info\",\"text\":\"a\"}\n{\"id\":2,\"user\":3,\"level\":\"info\",\"text\":\"b\"}",
                "another text",
            ),
        ] {
            let error = read_str(input).expect_err(input);
            assert!(error.contains(expected), "{input}: {error}");
        }
    }
}
