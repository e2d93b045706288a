//! Validation of `[telemetry]`: where traces go, how they are sampled, what they say of us.

use std::collections::BTreeMap;

use crate::config::raw::{RawSecret, RawTelemetry};
use crate::config::validate::Validator;
use crate::config::KeyPath;
use crate::secret::Secret;
use crate::telemetry::{OtlpProtocol, SamplerSetting, TelemetrySettings};

const SAMPLERS: &str = "always_on, always_off, traceidratio, parentbased_always_on, \
                        parentbased_always_off or parentbased_traceidratio";

impl Validator {
    pub(super) fn telemetry(&mut self, path: &KeyPath, raw: &RawTelemetry) -> TelemetrySettings {
        TelemetrySettings {
            endpoint: raw
                .endpoint
                .as_deref()
                .and_then(|endpoint| self.collector(&path.key("endpoint"), endpoint)),
            protocol: raw
                .protocol
                .as_deref()
                .and_then(|protocol| self.otlp_protocol(&path.key("protocol"), protocol)),
            headers: self.export_headers(&path.key("headers"), raw.headers.as_ref()),
            service_name: raw.service_name.clone(),
            sampler: raw
                .sampler
                .as_deref()
                .and_then(|sampler| self.sampler(path, sampler, raw.sampler_arg)),
            resource_attributes: raw
                .resource_attributes
                .iter()
                .flatten()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        }
    }

    fn collector(&mut self, path: &KeyPath, endpoint: &str) -> Option<String> {
        match endpoint.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some()
                    && uri.query().is_none() =>
            {
                Some(endpoint.trim_end_matches('/').to_owned())
            }
            _ => {
                self.problem(
                    path,
                    format!("`{endpoint}` is not a collector's http(s)://host:port address"),
                );
                None
            }
        }
    }

    fn otlp_protocol(&mut self, path: &KeyPath, protocol: &str) -> Option<OtlpProtocol> {
        match protocol {
            "http/protobuf" => Some(OtlpProtocol::HttpProtobuf),
            "grpc" => Some(OtlpProtocol::Grpc),
            _ => {
                self.problem(
                    path,
                    format!("`{protocol}` is not an OTLP protocol: \"http/protobuf\" or \"grpc\""),
                );
                None
            }
        }
    }

    fn export_headers(
        &mut self,
        path: &KeyPath,
        raw: Option<&BTreeMap<String, RawSecret>>,
    ) -> Vec<(String, Secret)> {
        let mut headers = Vec::new();
        for (name, value) in raw.into_iter().flatten() {
            let key_path = path.key(name);
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                self.problem(&key_path, format!("`{name}` is not a header name"));
                continue;
            }
            let Some(value) = self.secret(&key_path, value) else {
                continue;
            };
            if http::HeaderValue::from_str(value.expose()).is_err() {
                self.problem(&key_path, "the value is not a valid header value");
                continue;
            }
            headers.push((name.to_ascii_lowercase(), value));
        }
        headers
    }

    fn sampler(&mut self, path: &KeyPath, name: &str, arg: Option<f64>) -> Option<SamplerSetting> {
        if let Some(ratio) = arg {
            if !(0.0..=1.0).contains(&ratio) {
                self.problem(&path.key("sampler_arg"), "must be a ratio from 0.0 to 1.0");
                return None;
            }
        }
        let sampler = SamplerSetting::parse(name, arg);
        if sampler.is_none() {
            self.problem(
                &path.key("sampler"),
                format!("`{name}` is not a sampler: {SAMPLERS}"),
            );
        }
        sampler
    }
}
