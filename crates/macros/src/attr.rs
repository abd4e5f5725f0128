//! Parsing of the attribute arguments: `#[oncely::handler(consumer = "...")]`.

use proc_macro2::{Span, TokenStream};
use syn::parse::Parser;
use syn::{Expr, ExprLit, Lit, LitStr, Token};

/// What every argument error points the user to.
const USAGE: &str = "#[oncely::handler(consumer = \"billing\")]";

/// The parsed arguments of `#[oncely::handler(...)]`.
pub(crate) struct HandlerArgs {
    /// The consumer name: the first half of the inbox key.
    pub(crate) consumer: LitStr,
}

/// Parses the attribute arguments.
pub(crate) fn parse(args: TokenStream) -> syn::Result<HandlerArgs> {
    let mut consumer: Option<LitStr> = None;

    let parser = syn::meta::parser(|meta| {
        if !meta.path.is_ident("consumer") {
            let key = quote::ToTokens::to_token_stream(&meta.path).to_string();
            let key = key.replace(' ', "");
            return Err(meta.error(format!(
                "unknown argument `{key}`; expected `consumer = \"...\"`: {USAGE}"
            )));
        }
        if consumer.is_some() {
            return Err(meta.error(format!("duplicate `consumer` argument: {USAGE}")));
        }
        if !meta.input.peek(Token![=]) {
            return Err(meta.error(format!("expected `consumer = \"...\"`: {USAGE}")));
        }
        let value: Expr = meta.value()?.parse()?;
        let lit = match value {
            Expr::Lit(ExprLit {
                lit: Lit::Str(lit), ..
            }) => lit,
            other => {
                return Err(syn::Error::new_spanned(
                    other,
                    format!("`consumer` must be a string literal: {USAGE}"),
                ));
            }
        };
        let name = lit.value();
        if name.trim().is_empty() {
            return Err(syn::Error::new(
                lit.span(),
                format!("`consumer` must not be empty: {USAGE}"),
            ));
        }
        if name.trim() != name {
            return Err(syn::Error::new(
                lit.span(),
                "`consumer` must not start or end with whitespace",
            ));
        }
        consumer = Some(lit);
        Ok(())
    });
    parser.parse2(args)?;

    match consumer {
        Some(consumer) => Ok(HandlerArgs { consumer }),
        None => Err(syn::Error::new(
            Span::call_site(),
            format!("missing `consumer = \"...\"`: {USAGE}"),
        )),
    }
}
