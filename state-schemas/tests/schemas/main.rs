//! The tests of the schemas and fixtures, one test binary: the committed schemas and fixtures
//! agree with the code (`golden`), documents of older versions still decode (`migration`), and documents that must not decode do not (`rejections`).

mod common;
mod golden;
mod migration;
mod rejections;
