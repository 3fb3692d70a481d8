//! Config parsing and validation.

use super::*;
use crate::proxy::pool::Flavor;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, PathBuf::from("/etc/arkor"))
}

#[test]
fn empty_file_gives_the_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.base_domains, ["arkor.app"]);
    assert_eq!(c.http_addr(), Some("127.0.0.1:8080".parse().unwrap()));
    assert_eq!(c.limits.max_body_bytes, 16 * 1024 * 1024);
    assert_eq!(c.timeouts.upstream_first_byte, Duration::from_secs(120));
    assert_eq!(
        c.state_source(),
        StateSource::File(PathBuf::from("/etc/arkor/deployments.json"))
    );
    assert_eq!(c.admin_addr(), Some("127.0.0.1:9090".parse().unwrap()));
    assert_eq!(c.state_dir(), Path::new("/etc/arkor/../var/state"));
    assert!(c.admin.secret.is_none());
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(
        c.workers(),
        std::thread::available_parallelism().unwrap().get()
    );
}

#[test]
fn workers_are_as_set() {
    assert_eq!(parse("[listen]\nworkers = 3\n").unwrap().workers(), 3);
    assert!(parse("[listen]\nworkers = 1024\n").is_ok());
}

#[test]
fn full_file_parses() {
    let c = parse(
        r#"
base_domains = ["arkor.app", "Localhost."]
[listen]
http = "0.0.0.0:80"
[control_plane]
file = "/srv/d.json"
poll_interval = "250ms"
[[pools]]
name = "llama"
base_models = ["meta-llama/Llama-2-7b-hf"]
endpoints = ["http://10.0.0.5:8000", "h2c://10.0.0.6:8000/prefix"]
retries = 1
flavor = "vllm"
[[pools]]
name = "demo"
base_models = ["demo/echo"]
endpoints = ["builtin:echo"]
[limits]
max_body_bytes = 1024
[rate_limits]
requests_per_second = 2.5
burst = 5
[timeouts]
upstream_idle = "2m 30s"
"#,
    )
    .unwrap();
    assert_eq!(c.normalised_base_domains(), ["arkor.app", "localhost"]);
    assert_eq!(c.pools[0].retries, 1);
    assert_eq!(c.pools[0].flavor, Flavor::Vllm);
    assert_eq!(c.pools[1].retries, 2);
    assert_eq!(c.pools[1].flavor, Flavor::OpenAi);
    assert_eq!(c.control_plane.poll_interval, Duration::from_millis(250));
    assert_eq!(
        c.state_source(),
        StateSource::File(PathBuf::from("/srv/d.json"))
    );
    assert_eq!(c.timeouts.upstream_idle, Duration::from_secs(150));
    let r = c.rate_limits.unwrap();
    assert_eq!((r.requests_per_second, r.burst), (2.5, 5));
    assert!(parse("").unwrap().rate_limits.is_none());
    let e = parse("[rate_limits]\nrequests_per_second = 0\nburst = 0\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rate_limits.requests_per_second") && e.contains("rate_limits.burst"),
        "{e}"
    );
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let e = parse("[limits]\nmax_bodybytes = 5\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_bodybytes"), "{e}");
    let e = parse("colour = 1\n").unwrap_err().to_string();
    assert!(e.contains("colour"), "{e}");
}

#[test]
fn bad_values_are_refused_by_name() {
    let e = parse("[timeouts]\nclient_header = \"ten seconds\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("client_header"), "{e}");
    let e = parse(
        "[[pools]]\nname = \"p\"\nbase_models = [\"m\"]\nendpoints = [\"b\"]\nflavor = \"tgi\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tgi"), "{e}");
}

#[test]
fn durations_that_would_overflow_a_deadline_are_refused() {
    let e =
        parse("[timeouts]\nupstream_first_byte = \"500000000000y\"\nshutdown_grace = \"101y\"\n")
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("timeouts.upstream_first_byte: must be at most 100 years"),
        "{e}"
    );
    assert!(
        e.contains("timeouts.shutdown_grace: must be at most 100 years"),
        "{e}"
    );
    assert!(parse("[timeouts]\nupstream_idle = \"99y\"\n").is_ok());
}

#[test]
fn every_problem_is_reported_at_once() {
    let e = parse(
        r#"
base_domains = ["*.bad"]
[listen]
http = "nowhere"
workers = 1025
[[pools]]
name = "a"
base_models = ["m"]
endpoints = ["ftp://x", "http://"]
retries = 99
[[pools]]
name = "a"
base_models = ["m"]
endpoints = []
[limits]
max_header_bytes = 10
warm_connections = 1000001
[timeouts]
upstream_connect = "0s"
"#,
    )
    .unwrap_err();
    let all = e.to_string();
    for needle in [
        "base_domains[0]",
        "listen.http",
        "listen.workers",
        "pools[0].endpoints[0]",
        "pools[0].endpoints[1]",
        "pools[0].retries",
        "pools[1].name",
        "pools[1].base_models",
        "pools[1].endpoints",
        "limits.max_header_bytes",
        "limits.warm_connections",
        "timeouts.upstream_connect",
    ] {
        assert!(all.contains(needle), "missing {needle} in:\n{all}");
    }
    assert_eq!(e.0.len(), 12, "{all}");
}

#[test]
fn pull_mode_and_secrets() {
    let c = parse(
        "[control_plane]\nurl = \"http://127.0.0.1:7000/\"\ntoken = \"cp-token\"\n[admin]\ntoken = \"adm\"\n",
    )
    .unwrap();
    assert_eq!(
        c.state_source(),
        StateSource::Pull("http://127.0.0.1:7000".to_owned())
    );
    assert_eq!(
        c.control_plane.secret.as_ref().unwrap().expose(),
        "cp-token"
    );
    assert!(c.admin.secret.as_ref().unwrap().matches(b"adm"));
    assert!(!c.admin.secret.as_ref().unwrap().matches(b"adm2"));
    assert_eq!(format!("{:?}", c.admin.secret), "Some(Secret(…))");

    let e = parse("[control_plane]\nurl = \"ftp://x\"\nfile = \"d.json\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("either file or url"), "{e}");
    assert!(e.contains("control_plane.url"), "{e}");
    let e = parse("[admin]\ntoken = \"a\"\ntoken_env = \"B\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("only one of"), "{e}");
    let e = parse("[admin]\ntoken_env = \"ARKOR_TEST_SURELY_UNSET_VAR\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("admin.token_env"), "{e}");
    let e = parse("[admin]\ntoken = \"two words\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("admin.token"), "{e}");
    let e = parse("[log]\nformat = \"xml\"\n").unwrap_err().to_string();
    assert!(e.contains("xml"), "{e}");
}

#[test]
fn token_file_is_relative_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), "s3cret\n").unwrap();
    let c = Config::from_toml(
        "[admin]\ntoken_file = \"admin.token\"\n",
        dir.path().to_path_buf(),
    )
    .unwrap();
    assert!(c.admin.secret.unwrap().matches(b"s3cret"));
}

#[test]
fn pool_balancing_settings_are_checked() {
    let base =
        "[[pools]]\nname = \"p\"\nbase_models = [\"m\"]\nendpoints = [\"http://127.0.0.1:1\"]\n";
    let e = parse(&format!(
        "{base}max_ejected_share = 2.0\nload_factor = 0.5\neject_after = 0\nhealth_path = \"health\"\n"
    ))
    .unwrap_err()
    .to_string();
    for needle in [
        "max_ejected_share",
        "load_factor",
        "eject_after",
        "health_path",
    ] {
        assert!(e.contains(&format!("pools[0].{needle}")), "{needle}: {e}");
    }
    let ok = parse(&format!(
        "{base}api_key = \"k\"\nhealth_path = \"/health\"\n"
    ))
    .unwrap();
    assert_eq!(ok.pools[0].secret.as_ref().unwrap().expose(), "k");
    // An unset variable is reported under the field that names it.
    let e = parse(&format!(
        "{base}api_key_env = \"ARKOR_TEST_SURELY_UNSET_VAR\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("pools[0].api_key_env"), "{e}");
}

#[test]
fn llamacpp_needs_its_adapter_map() {
    let base =
        "[[pools]]\nname = \"p\"\nbase_models = [\"m\"]\nendpoints = [\"http://127.0.0.1:1\"]\n";
    let e = parse(&format!("{base}flavor = \"llamacpp\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("pools[0].adapters"), "{e}");
    let ok = parse(&format!(
        "{base}flavor = \"llamacpp\"\nadapters = {{ \"job-1\" = 0 }}\n"
    ))
    .unwrap();
    assert_eq!(ok.pools[0].adapters["job-1"], 0);
    let e = parse(&format!("{base}adapters = {{ \"job-1\" = 0 }}\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("only a llamacpp pool"), "{e}");
}

#[test]
fn sglang_base_models_hold_no_colon() {
    let pool = |model: &str| {
        format!(
            "[[pools]]\nname = \"p\"\nbase_models = [\"{model}\"]\nendpoints = [\"http://127.0.0.1:1\"]\nflavor = \"sglang\"\n"
        )
    };
    assert!(parse(&pool("meta-llama/Llama-2-7b-hf")).is_ok());
    let e = parse(&pool("llama3:8b")).unwrap_err().to_string();
    assert!(e.contains("pools[0].base_models: \"llama3:8b\""), "{e}");
}

#[test]
fn adapter_loading_is_for_vllm_pools_with_a_source() {
    let base =
        "[[pools]]\nname = \"p\"\nbase_models = [\"m\"]\nendpoints = [\"http://127.0.0.1:1\"]\n";
    let ok = parse(&format!(
        "{base}flavor = \"vllm\"\nload_adapters = true\nadapter_source = \"/m/{{job_id}}/checkpoint-{{step}}\"\nfinal_adapter_source = \"/m/{{job_id}}/final\"\n"
    ))
    .unwrap();
    let p = &ok.pools[0];
    assert!(p.load_adapters);
    assert_eq!(p.load_timeout, Duration::from_secs(30));
    assert_eq!(p.max_loaded_adapters, 4096);
    let defaults = parse(base).unwrap();
    assert!(!defaults.pools[0].load_adapters);
    for (extra, field) in [
        (
            "flavor = \"sglang\"\nload_adapters = true\nadapter_source = \"/m/{job_id}\"\n",
            "pools[0].load_adapters: only a vllm pool",
        ),
        (
            "flavor = \"vllm\"\nload_adapters = true\n",
            "pools[0].adapter_source: load_adapters needs",
        ),
        (
            "flavor = \"vllm\"\nadapter_source = \"/m/{job_id}\"\n",
            "pools[0].adapter_source: only used with load_adapters",
        ),
        (
            "flavor = \"vllm\"\nload_adapters = true\nadapter_source = \"/m/{jobid}\"\n",
            "pools[0].adapter_source: \"/m/{jobid}\": unknown placeholder {jobid}",
        ),
        (
            "flavor = \"vllm\"\nload_adapters = true\nadapter_source = \"/m/{job_id}/{step}\"\n",
            "pools[0].final_adapter_source: adapter_source uses {step}",
        ),
        (
            "flavor = \"vllm\"\nload_adapters = true\nadapter_source = \"/m/{job_id}\"\nload_timeout = \"0s\"\nmax_loaded_adapters = 0\n",
            "pools[0].load_timeout",
        ),
        (
            "flavor = \"vllm\"\nload_adapters = true\nadapter_source = \"/m/{job_id}\"\nmax_loaded_adapters = 0\n",
            "pools[0].max_loaded_adapters",
        ),
    ] {
        let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
}
