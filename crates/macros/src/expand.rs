//! Code generation for `#[oncely::handler]`.

use crate::attr::{self, Consumer, HandlerArgs};
use crate::item::{HandlerFn, HandlerImpl, HandlerSig};
use proc_macro2::{Delimiter, Group, Ident, Literal, Punct, Spacing, Span, TokenStream, TokenTree};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::{Attribute, ImplItemFn, Type};

/// Expands `#[oncely::handler(args)] item`.
///
/// On error the original item is emitted unchanged next to the error, so the rest of the crate
/// (and the IDE) still sees the function.
pub(crate) fn handler(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = attr::parse(args);
    if let Ok(block) = syn::parse2::<HandlerImpl>(item.clone()) {
        return match (args, block.validate()) {
            (Ok(args), Ok((method, sig))) => expand_impl(&args, &block, method, &sig),
            (args, sig) => with_errors(item, args.err(), sig.err()),
        };
    }
    let func = syn::parse2::<HandlerFn>(item.clone());
    let sig = func
        .as_ref()
        .map_err(Clone::clone)
        .and_then(HandlerFn::validate);
    // A free handler's name becomes an associated const, so it must be one already.
    let args = args.and_then(|args| match &args.consumer {
        Consumer::Expr(expr) => Err(syn::Error::new_spanned(
            expr,
            "on a free handler `consumer` must be a string literal or the path of a `&str` \
             constant; a name read from `self` needs `#[oncely::handler]` on an `impl` block",
        )),
        _ => Ok(args),
    });

    match (args, &func, sig) {
        (Ok(args), Ok(func), Ok(sig)) => expand(&args, func, &sig),
        (args, _, sig) => with_errors(item, args.err(), sig.err()),
    }
}

/// The item unchanged, followed by the errors.
fn with_errors(
    item: TokenStream,
    args: Option<syn::Error>,
    sig: Option<syn::Error>,
) -> TokenStream {
    let mut errors = args;
    if let Some(error) = sig {
        match &mut errors {
            Some(first) => first.combine(error),
            None => errors = Some(error),
        }
    }
    let errors = errors.map(syn::Error::into_compile_error);
    quote! {
        #item
        #errors
    }
}

/// Generates, next to the `impl` block as written, the `Handler` impl that calls its method
/// on the handler value, and the signature assertions.
fn expand_impl(
    args: &HandlerArgs,
    block: &HandlerImpl,
    method: &ImplItemFn,
    sig: &HandlerSig<'_>,
) -> TokenStream {
    let item = &block.block;
    let self_ty = &item.self_ty;
    let cfgs: Vec<&Attribute> = item
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg"))
        .collect();
    let name = &method.sig.ident;
    let consumer = &args.consumer;
    let message = sig.message;
    let handle = handle_fn(quote_spanned! {Span::call_site().located_at(name.span())=>
        ::oncely::__private::Box::pin(Self::#name(self, conn, msg))
    });
    let check = signature_check(sig);

    quote! {
        #item

        #(#cfgs)*
        impl ::oncely::Handler for #self_ty {
            type Message = #message;

            fn consumer_name(&self) -> &str {
                #consumer
            }

            #handle
        }

        #(#cfgs)*
        const _: () = {
            #check
        };
    }
}

/// `Handler::handle`, returning `boxed`.
fn handle_fn(boxed: TokenStream) -> TokenStream {
    quote! {
        fn handle<'c>(
            &'c self,
            conn: &'c mut ::oncely::__private::AsyncPgConnection,
            msg: ::oncely::__private::Envelope<Self::Message>,
        ) -> ::oncely::__private::BoxFuture<
            'c,
            ::oncely::__private::Result<(), ::oncely::__private::HandlerError>,
        > {
            #boxed
        }
    }
}

/// Generates the unit struct, its inherent `CONSUMER` and `call`, the `Handler` impl and the
/// signature assertions.
fn expand(args: &HandlerArgs, func: &HandlerFn, sig: &HandlerSig<'_>) -> TokenStream {
    let HandlerFn {
        attrs,
        vis,
        sig: signature,
        body,
    } = func;
    let name = &signature.ident;
    let consumer = &args.consumer;
    let message = sig.message;

    // `#[cfg]` applies to every generated item, doc comments go on the struct, everything else
    // (`#[allow]`, `#[tracing::instrument]`, ...) stays on the function that holds the body.
    let cfgs: Vec<&Attribute> = attrs.iter().filter(|a| a.path().is_ident("cfg")).collect();
    let docs = attrs.iter().filter(|a| a.path().is_ident("doc"));
    let rest = attrs
        .iter()
        .filter(|a| !a.path().is_ident("cfg") && !a.path().is_ident("doc"));

    let consumer_doc = format!(
        " The consumer name of this handler: `{}`.",
        consumer.describe()
    );
    let call_doc = format!(
        " Runs the body of `{name}` directly, outside any inbox transaction: what the \
         [`Handler`](::oncely::Handler) impl calls, and what unit tests can call."
    );

    let (conn_attrs, conn_pat) = (&sig.conn.attrs, &sig.conn.pat);
    let (msg_attrs, msg_pat) = (&sig.msg.attrs, &sig.msg.pat);

    // Errors about the boxed future (typically: it is not `Send`) point at the function name.
    let at_name = Span::call_site().located_at(name.span());
    let handle = handle_fn(quote_spanned! {at_name=>
        ::oncely::__private::Box::pin(Self::call(conn, msg))
    });

    let check = signature_check(sig);

    quote! {
        #(#cfgs)*
        #(#docs)*
        #[allow(non_camel_case_types)]
        #[derive(
            ::core::fmt::Debug,
            ::core::clone::Clone,
            ::core::marker::Copy,
            ::core::default::Default,
        )]
        #vis struct #name;

        #(#cfgs)*
        impl #name {
            #[doc = #consumer_doc]
            pub const CONSUMER: &'static str = #consumer;

            #[doc = #call_doc]
            #(#rest)*
            pub async fn call(
                #(#conn_attrs)* #conn_pat: &mut ::oncely::__private::AsyncPgConnection,
                #(#msg_attrs)* #msg_pat: ::oncely::__private::Envelope<#message>,
            ) -> ::oncely::__private::Result<(), ::oncely::__private::HandlerError>
            #body
        }

        #(#cfgs)*
        impl ::oncely::Handler for #name {
            type Message = #message;

            fn consumer_name(&self) -> &str {
                Self::CONSUMER
            }

            #handle
        }

        #(#cfgs)*
        const _: () = {
            #check
        };
    }
}

/// A never-called function that takes the types exactly as the user wrote them and checks
/// that each is the expected one, so that a mismatch is reported on the user's type.
fn signature_check(sig: &HandlerSig<'_>) -> TokenStream {
    let (conn_ty, msg_ty, output) = (&*sig.conn.ty, &*sig.msg.ty, sig.output);
    let message = sig.message;
    let conn = format_ident!("__oncely_conn");
    let msg = format_ident!("__oncely_msg");
    let out = format_ident!("__oncely_output");

    let conn_check = assert_type(
        conn_ty,
        quote!(&mut ::oncely::__private::AsyncPgConnection),
        &conn,
    );
    let msg_check = assert_type(
        msg_ty,
        quote!(::oncely::__private::Envelope<#message>),
        &msg,
    );
    let out_check = assert_type(
        output,
        quote!(::oncely::__private::Result<(), ::oncely::__private::HandlerError>),
        &out,
    );

    quote! {
        #[allow(dead_code, clippy::all)]
        fn __oncely_check_signature(#conn: #conn_ty, #msg: #msg_ty, #out: #output) {
            #conn_check
            #msg_check
            #out_check
        }
    }
}

/// `let _: EXPECTED = (value,).0;` where the expression `(value,).0` is given the first and
/// last spans of the user's type: rustc reports a mismatch on the expression, and an
/// expression's span runs from its first token to its last, so the error underlines the
/// user's whole type (`Span::join` is not available on stable).
fn assert_type(user: &Type, expected: TokenStream, value: &Ident) -> TokenStream {
    let mut tokens = user.to_token_stream().into_iter();
    let first = tokens.next().map_or_else(Span::call_site, |t| t.span());
    let last = tokens.last().map_or(first, |t| t.span());

    let mut tuple = Group::new(Delimiter::Parenthesis, quote!(#value,));
    tuple.set_span(first);
    let mut dot = Punct::new('.', Spacing::Alone);
    dot.set_span(last);
    let mut zero = Literal::usize_unsuffixed(0);
    zero.set_span(last);
    let expr: TokenStream = [
        TokenTree::Group(tuple),
        TokenTree::Punct(dot),
        TokenTree::Literal(zero),
    ]
    .into_iter()
    .collect();

    quote! {
        let _: #expected = #expr;
    }
}
