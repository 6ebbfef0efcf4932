//! End-to-end tests: the real server on a random port, a real database (a SQLite file, or a
//! fresh database in a throwaway PostgreSQL cluster), real gRPC clients.

mod common;
mod postgres_cluster;

mod abuse;
mod argon2_budget;
mod audit;
mod auth;
mod binary;
mod events;
mod gateway_ext_authz;
mod gateway_http;
mod gateway_proxies;
mod hostile_input;
mod hot_path;
mod idempotency;
mod lifecycle;
mod listing;
mod local_verifier;
mod lockout_race;
mod observability;
mod outage;
mod overload;
mod persistence;
mod process_faults;
mod replicas;
mod rotation;
mod secrets_scan;
mod server;
mod slow_database;
mod store;
mod transport;
mod trial;
mod update;
mod usage_report;
mod validation;
mod verify;
mod webhook_receiver;
mod webhook_store;
mod webhooks;
