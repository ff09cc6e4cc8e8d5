//! The command lines as an operator meets them in `--help`, the man pages and completions:
//! every command, flag, argument and value says what it is for.

/// Every visible subcommand of `command`, itself included, with its path (`baton status`).
fn walk(command: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
    let path = if path.is_empty() {
        command.get_name().to_owned()
    } else {
        format!("{path} {}", command.get_name())
    };
    out.push((path.clone(), command.clone()));
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        walk(sub, &path, out);
    }
}

fn all_commands() -> Vec<(String, clap::Command)> {
    let mut out = Vec::new();
    for command in baton_packaging::commands() {
        walk(&command, "", &mut out);
    }
    out
}

#[test]
fn the_three_binaries_are_described() {
    let names: Vec<String> = baton_packaging::commands()
        .iter()
        .map(|c| c.get_name().to_owned())
        .collect();
    assert_eq!(names, ["baton", "baton-proxy", "baton-stats"]);
    // clap's own consistency checks (conflicting names, dangling requirements), which a
    // binary would otherwise only meet when the flag is used.
    for command in baton_packaging::commands() {
        command.debug_assert();
    }
}

#[test]
fn every_command_flag_argument_and_value_has_a_description() {
    let mut missing = Vec::new();
    for (path, command) in all_commands() {
        let about = command
            .get_about()
            .map(|a| a.to_string())
            .unwrap_or_default();
        if about.trim().is_empty() {
            missing.push(format!("`{path}` has no description"));
        }
        for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
            let name = arg
                .get_long()
                .map(|l| format!("--{l}"))
                .unwrap_or_else(|| arg.get_id().to_string().to_uppercase());
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            if help.trim().is_empty() {
                missing.push(format!("`{path} {name}` has no description"));
            }
            // The values of an option that takes one (a flag's true and false are clap's own).
            let values = if arg.get_action().takes_values() {
                arg.get_possible_values()
            } else {
                Vec::new()
            };
            for value in values.iter().filter(|v| !v.is_hide_set()) {
                if value
                    .get_help()
                    .is_none_or(|h| h.to_string().trim().is_empty())
                {
                    missing.push(format!(
                        "`{path} {name} {}` has no description",
                        value.get_name()
                    ));
                }
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

#[test]
fn the_walk_sees_the_subcommands_and_their_flags() {
    // So that the test above cannot pass by walking nothing.
    let commands = all_commands();
    let paths: Vec<&str> = commands.iter().map(|(p, _)| p.as_str()).collect();
    for expected in [
        "baton run",
        "baton check",
        "baton status",
        "baton upgrade-supervisor",
    ] {
        assert!(paths.contains(&expected), "{expected} in {paths:?}");
    }
    assert!(
        !paths.contains(&"baton internal"),
        "hidden commands are not walked"
    );
    let (_, check) = commands.iter().find(|(p, _)| p == "baton check").unwrap();
    assert!(
        check
            .get_arguments()
            .any(|a| a.get_long() == Some("config"))
    );
}
