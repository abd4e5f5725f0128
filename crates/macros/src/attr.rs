//! Parsing of the attribute arguments: `#[oncely::handler(consumer = "...")]`.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::parse::Parser;
use syn::{Expr, ExprLit, ExprPath, Lit, LitStr, Token};

/// What every argument error points the user to.
const USAGE: &str = "#[oncely::handler(consumer = \"billing\")]";

/// The parsed arguments of `#[oncely::handler(...)]`.
pub(crate) struct HandlerArgs {
    /// The consumer name: the first half of the inbox key.
    pub(crate) consumer: Consumer,
}

/// How the consumer name is given.
pub(crate) enum Consumer {
    /// `consumer = "billing"`, checked here: not blank, no surrounding whitespace.
    Literal(LitStr),
    /// `consumer = CONSUMER`: a `&str` constant, so a service writes its name once.
    Path(ExprPath),
    /// Any other `&str` expression, e.g. `&self.name`: only on an `impl` block, where the
    /// handler value is in scope as `self`.
    Expr(Expr),
}

impl Consumer {
    /// The name as the generated docs show it.
    pub(crate) fn describe(&self) -> String {
        match self {
            Consumer::Literal(lit) => lit.value(),
            Consumer::Path(path) => path.to_token_stream().to_string().replace(' ', ""),
            Consumer::Expr(expr) => expr.to_token_stream().to_string(),
        }
    }
}

impl ToTokens for Consumer {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        match self {
            Consumer::Literal(lit) => lit.to_tokens(tokens),
            Consumer::Path(path) => path.to_tokens(tokens),
            Consumer::Expr(expr) => expr.to_tokens(tokens),
        }
    }
}

/// Parses the attribute arguments.
pub(crate) fn parse(args: TokenStream) -> syn::Result<HandlerArgs> {
    let mut consumer: Option<Consumer> = None;

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
            Expr::Path(path) => {
                consumer = Some(Consumer::Path(path));
                return Ok(());
            }
            other @ Expr::Lit(_) => {
                return Err(syn::Error::new_spanned(
                    other,
                    format!(
                        "`consumer` must be a string literal or the path of a `&str` constant: \
                         {USAGE}"
                    ),
                ));
            }
            other => {
                consumer = Some(Consumer::Expr(other));
                return Ok(());
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
        consumer = Some(Consumer::Literal(lit));
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
