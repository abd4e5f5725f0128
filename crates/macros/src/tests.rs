//! Expansion tests, run outside the compiler through `proc_macro2`'s fallback.
//! The compiler-facing behaviour is covered by the trybuild tests in `crates/oncely/tests/ui`.

use crate::expand::handler;
use proc_macro2::TokenStream;
use quote::{ToTokens, quote};
use syn::{ImplItem, Item};

fn expand(args: TokenStream, item: TokenStream) -> Vec<Item> {
    let output = handler(args, item);
    match syn::parse2::<syn::File>(output.clone()) {
        Ok(file) => file.items,
        Err(error) => panic!("expansion does not parse ({error}): {output}"),
    }
}

fn docs(attrs: &[syn::Attribute]) -> Vec<String> {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .map(|a| {
            let value = &a.meta.require_name_value()?.value;
            syn::parse2::<syn::LitStr>(value.to_token_stream()).map(|lit| lit.value())
        })
        .collect::<syn::Result<_>>()
        .expect("doc attributes are name-value")
}

fn has(attrs: &[syn::Attribute], name: &str) -> bool {
    attrs.iter().any(|a| a.path().is_ident(name))
}

fn valid_item() -> TokenStream {
    quote! {
        /// Creates the invoice.
        #[cfg(feature = "billing")]
        #[allow(clippy::needless_return)]
        pub(crate) async fn create_invoice(
            mut conn: &mut AsyncPgConnection,
            #[allow(unused)] msg: oncely::Envelope<OrderCreated>,
        ) -> Result<(), HandlerError> {
            return Ok(());
        }
    }
}

#[test]
fn expands_to_struct_inherent_impl_handler_impl_and_checks() {
    let items = expand(quote!(consumer = "billing"), valid_item());
    let [
        Item::Struct(unit),
        Item::Impl(inherent),
        Item::Impl(handler_impl),
        Item::Const(check),
    ] = items.as_slice()
    else {
        panic!("unexpected item kinds");
    };

    // The struct: name, visibility, docs; `#[cfg]` everywhere.
    assert_eq!(unit.ident, "create_invoice");
    assert_eq!(unit.vis.to_token_stream().to_string(), "pub (crate)");
    assert!(matches!(unit.fields, syn::Fields::Unit));
    assert_eq!(docs(&unit.attrs), [" Creates the invoice."]);
    // Other attributes stay on `call`.
    assert!(
        !unit
            .attrs
            .iter()
            .any(|a| a.to_token_stream().to_string().contains("needless_return"))
    );
    for attrs in [
        &unit.attrs,
        &inherent.attrs,
        &handler_impl.attrs,
        &check.attrs,
    ] {
        assert!(has(attrs, "cfg"), "missing #[cfg]");
    }

    // The inherent impl: `CONSUMER` and `call`, which keeps the other attributes.
    assert!(inherent.trait_.is_none());
    let [ImplItem::Const(consumer), ImplItem::Fn(call)] = inherent.items.as_slice() else {
        panic!("unexpected inherent items");
    };
    assert_eq!(consumer.ident, "CONSUMER");
    assert_eq!(consumer.expr.to_token_stream().to_string(), r#""billing""#);
    assert_eq!(call.sig.ident, "call");
    assert!(call.sig.asyncness.is_some());
    assert!(matches!(call.vis, syn::Visibility::Public(_)));
    assert!(has(&call.attrs, "allow"));
    assert!(!has(&call.attrs, "cfg"));
    let call_docs = docs(&call.attrs);
    assert_eq!(call_docs.len(), 1);
    assert!(!call_docs[0].contains("Creates the invoice"));
    let call_sig = call.sig.to_token_stream().to_string();
    assert!(call_sig.contains("mut conn : & mut :: oncely :: __private :: AsyncPgConnection"));
    assert!(
        call_sig.contains(
            "# [allow (unused)] msg : :: oncely :: __private :: Envelope < OrderCreated >"
        )
    );
    assert!(call_sig.contains(
        "-> :: oncely :: __private :: Result < () , :: oncely :: __private :: HandlerError >"
    ));
    assert!(
        call.block
            .to_token_stream()
            .to_string()
            .contains("return Ok (())")
    );

    // The trait impl.
    let trait_path = handler_impl.trait_.as_ref().map(|(_, path, _)| path);
    assert_eq!(
        trait_path.to_token_stream().to_string(),
        ":: oncely :: Handler"
    );
    let message = handler_impl.items.iter().find_map(|item| match item {
        ImplItem::Type(ty) if ty.ident == "Message" => Some(ty.ty.to_token_stream().to_string()),
        _ => None,
    });
    assert_eq!(message.as_deref(), Some("OrderCreated"));
}

fn error_of(args: TokenStream, item: TokenStream) -> String {
    let items = expand(args, item);
    // The original item comes first, unchanged, so the IDE keeps seeing the function.
    assert!(
        matches!(items.first(), Some(Item::Fn(_) | Item::Impl(_))),
        "original item not re-emitted"
    );
    items
        .iter()
        .filter_map(|item| match item {
            Item::Macro(mac)
                if mac.mac.path.segments.last().map(|s| &s.ident)
                    == Some(&quote::format_ident!("compile_error")) =>
            {
                let message = mac.mac.parse_body::<syn::LitStr>();
                Some(message.expect("compile_error! takes a string").value())
            }
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each item, under `consumer = "x"`, fails with an error containing its text.
fn expect_errors(cases: &[(TokenStream, &str)]) {
    for (item, expected) in cases {
        let error = error_of(quote!(consumer = "x"), item.clone());
        assert!(
            error.contains(expected),
            "{item}: expected {expected:?}, got {error}"
        );
    }
}

#[test]
fn attribute_errors() {
    let missing = error_of(quote!(), valid_item());
    assert!(
        missing.contains(r#"missing `consumer = "..."`: #[oncely::handler(consumer = "billing")]"#),
        "{missing}"
    );
    let empty = error_of(quote!(consumer = ""), valid_item());
    assert!(empty.contains("`consumer` must not be empty"), "{empty}");
    let unknown = error_of(quote!(consumer = "x", queue = "y"), valid_item());
    assert!(unknown.contains("unknown argument `queue`"), "{unknown}");
    let not_string = error_of(quote!(consumer = 42), valid_item());
    assert!(
        not_string.contains("must be a string literal or the path of a `&str` constant"),
        "{not_string}"
    );
    let from_self = error_of(quote!(consumer = &self.name), valid_item());
    assert!(
        from_self.contains("needs `#[oncely::handler]` on an `impl` block"),
        "{from_self}"
    );
    let padded = error_of(quote!(consumer = " billing"), valid_item());
    assert!(padded.contains("whitespace"), "{padded}");
}

#[test]
fn signature_errors() {
    let cases = [
        (
            quote!(
                fn h(c: &mut C, m: Envelope<M>) -> R {}
            ),
            "oncely handlers must be `async fn`",
        ),
        (
            quote!(
                async fn h(c: &mut C) -> R {}
            ),
            "oncely handlers take exactly 2 arguments, found 1; expected `async fn h(conn: &mut \
             AsyncPgConnection, msg: Envelope<T>) -> Result<(), HandlerError>`",
        ),
        (
            quote!(
                async fn h<T>(c: &mut C, m: Envelope<T>) -> R {}
            ),
            "cannot be generic",
        ),
        (
            quote!(
                async fn h(&self, c: &mut C, m: Envelope<M>) -> R {}
            ),
            "cannot take `self`",
        ),
        (
            quote!(
                async fn h(c: C, m: Envelope<M>) -> R {}
            ),
            "must be `&mut AsyncPgConnection`",
        ),
        (
            quote!(
                async fn h(c: &mut C, m: M) -> R {}
            ),
            "must be `Envelope<T>`",
        ),
        (
            quote!(
                async fn h(c: &mut C, m: Envelope<M>) {}
            ),
            "missing return type",
        ),
        (
            quote!(
                const async fn h(c: &mut C, m: Envelope<M>) -> R {}
            ),
            "`const fn`",
        ),
        (
            quote!(
                async unsafe fn h(c: &mut C, m: Envelope<M>) -> R {}
            ),
            "`unsafe fn`",
        ),
        (
            quote!(
                async extern "C" fn h(c: &mut C, m: Envelope<M>) -> R {}
            ),
            "`extern fn`",
        ),
    ];
    expect_errors(&cases);
}

#[test]
fn attribute_and_signature_errors_are_reported_together() {
    let error = error_of(
        quote!(),
        quote!(
            fn h(c: &mut C, m: Envelope<M>) -> R {}
        ),
    );
    assert!(error.contains("missing `consumer"), "{error}");
    assert!(error.contains("must be `async fn`"), "{error}");
}

#[test]
fn not_a_function() {
    let output = handler(
        quote!(consumer = "x"),
        quote!(
            struct NotAFn;
        ),
    )
    .to_string();
    assert!(output.starts_with("struct NotAFn ;"), "{output}");
    assert!(output.contains("applies to an `async fn`"), "{output}");
}

#[test]
fn a_constant_path_names_the_consumer() {
    let items = expand(quote!(consumer = crate::CONSUMER), valid_item());
    let Some(Item::Impl(inherent)) = items.get(1) else {
        panic!("no inherent impl");
    };
    let Some(ImplItem::Const(consumer)) = inherent.items.first() else {
        panic!("no CONSUMER");
    };
    assert_eq!(
        consumer.expr.to_token_stream().to_string(),
        "crate :: CONSUMER"
    );
    assert_eq!(
        docs(&consumer.attrs),
        [" The consumer name of this handler: `crate::CONSUMER`."]
    );
}

fn valid_impl() -> TokenStream {
    quote! {
        #[cfg(feature = "fulfillment")]
        impl ReserveStock {
            /// Reserves the stock.
            pub async fn reserve(
                &self,
                conn: &mut AsyncPgConnection,
                msg: Envelope<OrderCreated>,
            ) -> Result<(), HandlerError> {
                Ok(())
            }
        }
    }
}

#[test]
fn an_impl_block_keeps_its_method_and_gains_a_handler_impl() {
    let items = expand(quote!(consumer = &self.name), valid_impl());
    let [
        Item::Impl(inherent),
        Item::Impl(handler_impl),
        Item::Const(check),
    ] = items.as_slice()
    else {
        panic!("unexpected item kinds");
    };
    assert!(inherent.trait_.is_none());
    assert!(matches!(inherent.items.as_slice(), [ImplItem::Fn(f)] if f.sig.ident == "reserve"));
    for attrs in [&handler_impl.attrs, &check.attrs] {
        assert!(has(attrs, "cfg"), "missing #[cfg]");
    }
    let handler_trait = handler_impl.trait_.as_ref().map(|(_, path, _)| path);
    assert_eq!(
        handler_trait.to_token_stream().to_string(),
        ":: oncely :: Handler"
    );
    assert_eq!(
        handler_impl.self_ty.to_token_stream().to_string(),
        "ReserveStock"
    );
    let body = |name: &str| {
        handler_impl.items.iter().find_map(|item| match item {
            ImplItem::Fn(f) if f.sig.ident == name => Some(f.block.to_token_stream().to_string()),
            _ => None,
        })
    };
    assert_eq!(body("consumer_name").as_deref(), Some("{ & self . name }"));
    let handle = body("handle").expect("handle");
    assert!(
        handle.contains("Self :: reserve (self , conn , msg)"),
        "{handle}"
    );
}

#[test]
fn impl_block_errors() {
    let cases = [
        (
            quote!(
                impl Handler for H {
                    async fn h(&self, c: &mut C, m: Envelope<M>) -> R {}
                }
            ),
            "not a trait impl",
        ),
        (
            quote!(
                impl<T> H<T> {
                    async fn h(&self, c: &mut C, m: Envelope<M>) -> R {}
                }
            ),
            "cannot be generic",
        ),
        (
            quote!(
                impl H {
                    async fn h(&self, c: &mut C, m: Envelope<M>) -> R {}
                    fn helper(&self) {}
                }
            ),
            "holds exactly one method, found 2",
        ),
        (
            quote!(
                impl H {
                    async fn h(c: &mut C, m: Envelope<M>) -> R {}
                }
            ),
            "takes `&self` first",
        ),
        (
            quote!(
                impl H {
                    async fn h(&mut self, c: &mut C, m: Envelope<M>) -> R {}
                }
            ),
            "an oncely handler method takes `&self`; expected `async fn h(&self, conn",
        ),
        (
            quote!(
                impl H {
                    async fn h(&self, c: &mut C) -> R {}
                }
            ),
            "take exactly 2 arguments after `&self`, found 1",
        ),
        (
            quote!(
                impl H {
                    fn h(&self, c: &mut C, m: Envelope<M>) -> R {}
                }
            ),
            "must be `async fn`",
        ),
    ];
    expect_errors(&cases);
}
