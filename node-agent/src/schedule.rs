//! Time windows in which the provider lends the machine, e.g. `Mon-Fri 18:00-08:00`: a pure
//! parser and evaluator over a weekday and a minute of the day (the caller supplies local time).

use std::fmt;

/// Minutes in a day; `24:00` is allowed as an end.
const DAY_MINUTES: u16 = 24 * 60;
const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// One window: on the given days, from `start` to `end` (minutes after midnight). A window whose
/// end is not after its start crosses midnight and ends the next day: `Fri 22:00-06:00` covers
/// Saturday 05:00 but not Friday 05:00.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Bit 0 is Monday, bit 6 Sunday: the days the window starts on.
    days: u8,
    start: u16,
    end: u16,
}

/// Why a window did not parse; the text says what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid time window {input:?}: {reason}; expected e.g. \"Mon-Fri 18:00-08:00\", \"Sat,Sun 00:00-24:00\" or \"22:00-06:00\" (every day)")]
pub struct WindowError {
    input: String,
    reason: String,
}

impl Window {
    /// Parses `[DAYS] HH:MM-HH:MM`. DAYS is a comma list of days or day ranges (`Mon-Fri`,
    /// `Fri-Mon` wraps over the weekend, `Sat,Sun`), `daily` or omitted for every day. Day
    /// names are case-insensitive, three letters or in full.
    pub fn parse(input: &str) -> Result<Window, WindowError> {
        let err = |reason: &str| WindowError { input: input.chars().take(100).collect(), reason: reason.to_string() };
        let mut parts = input.split_whitespace();
        let (days_text, times_text) = match (parts.next(), parts.next(), parts.next()) {
            (Some(times), None, None) => (None, times),
            (Some(days), Some(times), None) => (Some(days), times),
            (None, _, _) => return Err(err("it is empty")),
            _ => return Err(err("too many parts")),
        };
        let days = match days_text {
            None => 0x7f,
            Some(d) if d.eq_ignore_ascii_case("daily") => 0x7f,
            Some(d) => parse_days(d).map_err(|r| err(&r))?,
        };
        let (start, end) = times_text.split_once('-').ok_or_else(|| err("the times need a '-' between start and end"))?;
        let start = parse_time(start).filter(|m| *m < DAY_MINUTES).ok_or_else(|| err(&format!("{start:?} is not a time of day (HH:MM, 00:00 to 23:59)")))?;
        let end = parse_time(end).ok_or_else(|| err(&format!("{end:?} is not a time of day (HH:MM, 00:00 to 24:00)")))?;
        if start == end % DAY_MINUTES && end != DAY_MINUTES {
            return Err(err("start and end are equal, so it is empty; write 00:00-24:00 for a whole day"));
        }
        Ok(Window { days, start, end })
    }

    /// Whether the window is open at `minute` (after midnight) of `weekday` (0 = Monday).
    pub fn contains(&self, weekday: u8, minute: u16) -> bool {
        let starts_on = |d: u8| self.days & (1 << (d % 7)) != 0;
        if self.start < self.end {
            starts_on(weekday) && self.start <= minute && minute < self.end
        } else {
            // Crosses midnight: the evening part today, or the morning part of yesterday's window.
            (starts_on(weekday) && minute >= self.start) || (starts_on((weekday + 6) % 7) && minute < self.end)
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        if self.days != 0x7f {
            write!(f, "{} ", days_text(self.days))?;
        }
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

/// Whether any window is open; no windows at all means always.
pub fn open(windows: &[Window], weekday: u8, minute: u16) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.contains(weekday, minute))
}

/// Today's weekday (0 = Monday) and minute of the day in the machine's local time zone.
pub fn local_now() -> (u8, u16) {
    use chrono::{Datelike, Timelike};
    let now = chrono::Local::now();
    (now.weekday().num_days_from_monday() as u8, (now.hour() * 60 + now.minute()) as u16)
}

/// "Mon-Fri 18:00-08:00, Sat,Sun 00:00-24:00".
pub fn describe(windows: &[Window]) -> String {
    windows.iter().map(Window::to_string).collect::<Vec<_>>().join(", ")
}

fn parse_days(text: &str) -> Result<u8, String> {
    let mut days = 0u8;
    for item in text.split(',') {
        let day = |name: &str| day_index(name).ok_or_else(|| format!("{name:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"));
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                let mut d = from;
                loop {
                    days |= 1 << d;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days |= 1 << day(item)?,
        }
    }
    Ok(days)
}

fn day_index(name: &str) -> Option<u8> {
    const FULL: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
    let lower = name.to_ascii_lowercase();
    FULL.iter().position(|f| *f == lower || (lower.len() == 3 && f.starts_with(&lower))).map(|i| i as u8)
}

fn parse_time(text: &str) -> Option<u16> {
    let (h, m) = text.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    let minutes = h * 60 + m;
    (m < 60 && minutes <= DAY_MINUTES).then_some(minutes)
}

/// Days as the shortest text: "Mon-Fri", "Sat,Sun", "Fri-Mon".
fn days_text(days: u8) -> String {
    let on = |d: usize| days & (1 << (d % 7)) != 0;
    // Start at a day whose predecessor is off, so a run over Sunday prints as one range.
    let first = (0..7).find(|d| on(*d) && !on(d + 6)).unwrap_or(0);
    let mut runs = Vec::new();
    let mut d = first;
    while d < first + 7 {
        if !on(d) {
            d += 1;
            continue;
        }
        let from = d;
        while d + 1 < first + 7 && on(d + 1) {
            d += 1;
        }
        runs.push(match d - from {
            0 => DAY_NAMES[from % 7].to_string(),
            1 => format!("{},{}", DAY_NAMES[from % 7], DAY_NAMES[d % 7]),
            _ => format!("{}-{}", DAY_NAMES[from % 7], DAY_NAMES[d % 7]),
        });
        d += 1;
    }
    runs.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MON: u8 = 0;
    const FRI: u8 = 4;
    const SAT: u8 = 5;
    const SUN: u8 = 6;

    fn at(h: u16, m: u16) -> u16 {
        h * 60 + m
    }

    #[test]
    fn windows_are_open_exactly_when_their_text_says() {
        let table: &[(&str, u8, u16, bool)] = &[
            ("Mon-Fri 09:00-17:00", MON, at(9, 0), true),
            ("Mon-Fri 09:00-17:00", MON, at(17, 0), false),
            ("Mon-Fri 09:00-17:00", MON, at(8, 59), false),
            ("Mon-Fri 09:00-17:00", SAT, at(12, 0), false),
            // Crossing midnight: Friday evening's window runs into Saturday morning...
            ("Mon-Fri 18:00-08:00", FRI, at(23, 30), true),
            ("Mon-Fri 18:00-08:00", SAT, at(7, 59), true),
            ("Mon-Fri 18:00-08:00", SAT, at(8, 0), false),
            ("Mon-Fri 18:00-08:00", SAT, at(18, 0), false),
            // ...and Monday morning belongs to Sunday's window, which does not exist.
            ("Mon-Fri 18:00-08:00", MON, at(7, 0), false),
            ("Mon-Fri 18:00-08:00", MON, at(18, 0), true),
            ("Sun 22:00-06:00", MON, at(5, 0), true),
            ("sat,SUN 00:00-24:00", SUN, at(23, 59), true),
            ("sat,SUN 00:00-24:00", MON, at(0, 0), false),
            ("Fri-Mon 10:00-11:00", SUN, at(10, 30), true),
            ("Fri-Mon 10:00-11:00", FRI, at(10, 30), true),
            ("Fri-Mon 10:00-11:00", 2, at(10, 30), false),
            ("22:00-06:00", 2, at(3, 0), true),
            ("daily 22:00-06:00", 2, at(12, 0), false),
            ("Saturday 8:00-9:30", SAT, at(9, 29), true),
            ("Mon 00:00-00:30", SUN, at(0, 10), false),
        ];
        for (text, day, minute, want) in table {
            let w = Window::parse(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(w.contains(*day, *minute), *want, "{text} on day {day} at {}:{:02}", minute / 60, minute % 60);
        }
    }

    #[test]
    fn bad_windows_are_refused_with_the_reason() {
        let table = [
            ("", "it is empty"),
            ("Mon-Fri", "\"Mon\" is not a time of day"),
            ("Mon-Fri 18:00", "'-' between start and end"),
            ("Mon-Fry 18:00-08:00", "\"Fry\" is not a day"),
            ("Mon 25:00-26:00", "\"25:00\" is not a time of day"),
            ("Mon 10:60-11:00", "\"10:60\" is not a time of day"),
            ("Mon 10:00-24:01", "\"24:01\" is not a time of day"),
            ("Mon 24:00-02:00", "\"24:00\" is not a time of day"),
            ("Mon 10:00-10:00", "start and end are equal"),
            ("Mon 10-11", "is not a time of day"),
            ("Mon Tue 10:00-11:00", "too many parts"),
        ];
        for (text, reason) in table {
            let err = Window::parse(text).unwrap_err().to_string();
            assert!(err.contains(reason), "{text:?}: {err}");
            assert!(err.contains("Mon-Fri 18:00-08:00"), "the error shows a valid example: {err}");
        }
    }

    #[test]
    fn windows_print_back_in_a_canonical_form() {
        for (text, shown) in [
            ("mon-fri 18:00-08:00", "Mon-Fri 18:00-08:00"),
            ("Sat,Sunday 0:00-24:00", "Sat,Sun 00:00-24:00"),
            ("Fri-Mon 10:00-11:00", "Fri-Mon 10:00-11:00"),
            ("Mon,Wed,Fri 10:00-11:00", "Mon,Wed,Fri 10:00-11:00"),
            ("daily 22:00-06:00", "22:00-06:00"),
            ("Mon-Sun 22:00-06:00", "22:00-06:00"),
        ] {
            let w = Window::parse(text).unwrap();
            assert_eq!(w.to_string(), shown);
            assert_eq!(Window::parse(shown).unwrap(), w, "{shown} parses back");
        }
    }

    #[test]
    fn no_windows_means_always_and_several_mean_any() {
        assert!(open(&[], SUN, at(3, 0)));
        let ws = [Window::parse("Mon-Fri 18:00-08:00").unwrap(), Window::parse("Sat,Sun 00:00-24:00").unwrap()];
        assert!(open(&ws, SAT, at(12, 0)));
        assert!(!open(&ws, MON, at(7, 0)), "Sunday's all-day window ends at midnight and no window starts on Sunday evening");
        assert!(!open(&ws, MON, at(12, 0)));
        assert_eq!(describe(&ws), "Mon-Fri 18:00-08:00, Sat,Sun 00:00-24:00");
    }
}
