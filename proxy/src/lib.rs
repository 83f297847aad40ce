//! meshproxy
