//! The examples' command lines: `--name value` flags and `--switch`es, split by `lexopt`.
//! An unknown flag, a missing value or one that does not parse is an error naming it and
//! listing what the example takes, rather than a default used in silence.

// Each example uses the part it needs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::str::FromStr;

use candle_higher::{Error, Result};

/// The flags given to this process.
pub(crate) struct Args {
    values: HashMap<&'static str, String>,
    switches: Vec<&'static str>,
}

fn error(message: String) -> Error {
    Error::InvalidArgument {
        op: "command line",
        message,
    }
}

impl Args {
    /// Reads the process's arguments: each of `valued` (names without `--`) takes a value,
    /// each of `switches` none.
    pub(crate) fn parse(valued: &[&'static str], switches: &[&'static str]) -> Result<Args> {
        let takes = || {
            let mut all: Vec<String> = valued.iter().map(|n| format!("--{n} VALUE")).collect();
            all.extend(switches.iter().map(|n| format!("--{n}")));
            all.join(", ")
        };
        let mut args = Args {
            values: HashMap::new(),
            switches: Vec::new(),
        };
        let mut parser = lexopt::Parser::from_env();
        while let Some(arg) = parser.next().map_err(|e| error(e.to_string()))? {
            let known = |names: &[&'static str]| match &arg {
                lexopt::Arg::Long(name) => names.iter().copied().find(|n| n == name),
                _ => None,
            };
            if let Some(name) = known(valued) {
                let value = parser.value().map_err(|e| error(e.to_string()))?;
                let value = value
                    .into_string()
                    .map_err(|v| error(format!("--{name}: {v:?} is not unicode")))?;
                args.values.insert(name, value);
            } else if let Some(name) = known(switches) {
                args.switches.push(name);
            } else {
                let unexpected = arg.unexpected();
                return Err(error(format!(
                    "{unexpected}; this example takes {}",
                    takes()
                )));
            }
        }
        Ok(args)
    }

    /// The value of `--name` parsed as a `T`, or `default` when the flag is absent.
    pub(crate) fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        self.get_opt(name).map(|v| v.unwrap_or(default))
    }

    /// The value of `--name` parsed as a `T`, if given.
    pub(crate) fn get_opt<T: FromStr>(&self, name: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.values
            .get(name)
            .map(|v| v.parse().map_err(|e| error(format!("--{name} {v:?}: {e}"))))
            .transpose()
    }

    /// Whether `--name` was given.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.switches.contains(&name)
    }
}
